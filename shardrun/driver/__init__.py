"""The driver side of a run, whatever launches it: the console, the run's log lines and summary, the
observer that writes metrics.jsonl and Prometheus targets, the run dir, and the local launcher."""
