"""Exceptions `core` raises on purpose. Each message says what went wrong and what to do; pages show it."""


class ProdcatError(Exception):
    """Base of every refusal a user can act on (pages catch it and show `st.error(str(exc))`)."""


class ImageRefused(ProdcatError):
    """A file is not an image we accept. `name` is the file as the user knows it, `reason` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.image_id: int | None = None  # set when the file is a stored catalogue image


class ArchiveRefused(ProdcatError):
    """A whole archive is refused (encrypted, too many entries, not a zip...)."""


class NotFound(ProdcatError):
    """An image, category, model version or job id that does not exist."""


class CategoryError(ProdcatError):
    """Category name empty, too long, duplicate, archived, or a merge onto itself."""


class TrainingRefused(ProdcatError):
    """Training cannot start: too little data, a job already queued or running, bad parameters."""


class CheckpointError(ProdcatError):
    """A checkpoint or its sidecar is missing, corrupt, or not a safetensors file."""


class JobCancelled(ProdcatError):
    """Raised inside a training run when the user asked to cancel it."""


class DuplicateRefused(ProdcatError):
    """"Keep this one" cannot run: the kept image is not in the group, or the group has one image."""
