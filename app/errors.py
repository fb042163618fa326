"""The one exception tree of vtp.

Every failure a user can see is one of these; errors from ffmpeg, CTranslate2, Redis or
msgspec are mapped onto it at the edge where they happen, so the CLI, the workers and the
web process can turn any of them into a one-line reason (and a job state) without a
traceback::

    VtpError
    ├── InputError               the user's input is unusable; retrying will not help
    │   ├── InputNotFound        missing path, or a directory
    │   ├── EmptyMedia           zero bytes
    │   ├── CorruptMedia         ffmpeg cannot read it (truncated, random bytes, wrong name)
    │   ├── NoAudioStream        a video with no audio track
    │   ├── MediaTooLarge        over the configured size limit
    │   ├── MediaTooLong         over the configured duration limit (VTP_MAX_DURATION)
    │   └── UnsupportedFormat    a container ffmpeg reads but vtp refuses (playlists, devices, ...)
    ├── OptionsError             bad engine/model/format options
    │   └── Forbidden            a URL the SSRF guard refuses (private, loopback, metadata)
    │   ├── ModelNotFound        --model names neither a directory nor a loadable model
    ├── EngineError              the speech model failed while running (may be transient)
    ├── StorageError             artifact storage failed (transient)
    ├── QueueError               Redis / the job queue is unreachable (transient)
    ├── JobError                 a job-level failure (unknown id, cancelled, invalid transition)
    │   ├── JobNotFound
    │   └── JobCancelled
    └── FleetError               the fleet controller's cloud API failed (Fly Machines, Kubernetes)
        ├── FleetAuthError       the API rejected the token / credentials: the controller exits
        └── NoCapacity           a region or machine kind could not place or start a machine

``permanent`` tells the distributed runner whether a retry could help: input and option
errors fail a job at once, everything else is retried with backoff.
"""

from __future__ import annotations


class VtpError(Exception):
    """Base class: ``str(err)`` is a complete, one-line, user-facing reason."""

    permanent: bool = False


class InputError(VtpError):
    permanent = True


class InputNotFound(InputError):
    pass


class EmptyMedia(InputError):
    pass


class CorruptMedia(InputError):
    pass


class NoAudioStream(InputError):
    pass


class MediaTooLarge(InputError):
    pass


class MediaTooLong(InputError):
    pass


class UnsupportedFormat(InputError):
    pass


class OptionsError(VtpError):
    permanent = True


class ModelNotFound(OptionsError):
    pass


class Forbidden(OptionsError):
    pass


class EngineError(VtpError):
    pass


class StorageError(VtpError):
    pass


class QueueError(VtpError):
    pass


class JobError(VtpError):
    permanent = True


class JobNotFound(JobError):
    pass


class JobCancelled(JobError):
    pass


class FleetError(VtpError):
    pass


class FleetAuthError(FleetError):
    permanent = True


class NoCapacity(FleetError):
    pass
