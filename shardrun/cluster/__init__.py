"""Driver side: connect to Ray, launch the worker group, follow it, write the summary."""
