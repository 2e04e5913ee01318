"""Errors that are the user's to fix: printed as one line, exit status 2."""

import re


class UserError(Exception):
    """Bad input (job spec, data, storage, address): the message says what, where and the fix."""


class TrainingDiverged(Exception):
    """The loss stopped being finite (failure.nonfinite_loss); the message says at which step and what to try."""


class DataStalled(Exception):
    """Storage gave no data in failure.data_wait_timeout_s; the message names the file and row group. Not the
    user's to fix: a restart may find the storage answering again."""


class RepeatedFailure(Exception):
    """A worker's error came back at the same step in failure.same_failure_limit attempts of the group: a
    restart would meet it again. The message says which error, where and how often."""


class CheckpointStalled(Exception):
    """A checkpoint's upload or its conversion to DeepSpeed's universal format took longer than
    failure.checkpoint_timeout_s; the message names the checkpoint. Retried under max_failures."""


class Preempted(Exception):
    """This group stopped after checkpointing because a VM it runs on is being taken away; it resumes
    from that checkpoint (Ray Train restarts it; under torchrun, start the run again)."""


_SECRETS = [
    # query parameters and connection-string fields: SAS signatures, client secrets, keys, session tokens
    (re.compile(r"\b(sig|client_secret|secret|secret_key|secret_access_key|access_key|session_token|"
                r"security_token|x-amz-signature|x-amz-security-token|token|accountkey|account_key|password)="
                r"(?:[^&;\s'\":]|:(?!\s|$))+", re.IGNORECASE), r"\1=***"),  # a ": " after it is the message's
    # the user part of a URI: s3://KEY:SECRET@bucket, abfs://container:ACCOUNT_KEY@account (keys hold / and +)
    (re.compile(r"(://[^/:@\s]+):[^@\s'\"]+@"), r"\1:***@"),
    (re.compile(r"\b(bearer)\s+[\w.~+/=-]+", re.IGNORECASE), r"\1 ***"),
]


def first_line(text: str) -> str:
    """An error message's first line, without leading blank lines ("" for none)."""
    return (text.strip().splitlines() or [""])[0]


def redact(text: str) -> str:
    """Text with the secrets of storage URIs (SAS signatures, keys in the user part) masked."""
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text


class RedactingStream:
    """A text stream that masks secrets in whatever passes through it (Ray prints its workers' and
    controller's logs through the driver's sys.stdout and sys.stderr, request URLs with SAS included)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
