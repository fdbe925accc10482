"""Configuration: one pydantic-settings object read from PRODCAT_* environment variables and `.env`."""

from __future__ import annotations

import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# What PRODCAT_DEVICE may say; whether that hardware is there is models.devices.pick_device's call, when it is used.
DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# What PRODCAT_TRAIN_DEVICES may say (spaces removed): a list of cpu or cuda:N, a GPU count, or all GPUs.
TRAIN_DEVICES = re.compile(r"all|[1-9][0-9]*|(cpu|cuda:[0-9]+)(,(cpu|cuda:[0-9]+))*")
# The keys keyboard review gives categories, in the order it hands them out: digits, then letters but c and r
# (Streamlit's own shortcuts: clear cache, rerun) and u (Undo on the Review page).
REVIEW_HOTKEYS = "1234567890" + "".join(c for c in string.ascii_lowercase if c not in "cru")


class Settings(BaseSettings):
    """Everything prodcat can be told from outside. Two instances with two data directories share nothing."""

    model_config = SettingsConfigDict(env_prefix="PRODCAT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Database, images, checkpoints and caches live here.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir.")

    # Image validation and storage.
    max_image_side: int = Field(20_000, gt=0, description="Refuse images with a longer side than this.")
    max_image_pixels: int = Field(80_000_000, gt=0, description="Refuse images with more pixels than this.")
    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Refuse files larger than this.")
    max_trailing_bytes: int = Field(
        1024,
        ge=0,
        description="Refuse PNG, JPEG, GIF and WebP files with more than this many bytes after the image's end "
        "(junk, or another file appended: a polyglot). A little padding is common and allowed.",
    )
    thumbnail_size: int = Field(256, gt=0, description="Longest side of the stored grid thumbnail.")
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test shares, fixed per image at ingest from its hash."
    )

    # Zip archives.
    zip_max_entries: int = Field(20_000, gt=0)
    zip_max_total_bytes: int = Field(4 * 1024**3, gt=0, description="Cap on bytes actually decompressed.")
    zip_max_ratio: float = Field(
        100.0,
        gt=1,
        description="Refuse, before inflating it, a zip entry (or a whole archive) that expands more than this many "
        "times its compressed size (a zip bomb); photos hardly compress. Entries under 1 MiB are not held to it.",
    )

    # Model engine.
    device: str = Field(
        "auto",
        description="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N (the GPU with index N, e.g. cuda:1 "
        "for a worker given a machine's second GPU) or mps. A GPU that is not there is refused when used.",
    )
    train_devices: str | None = Field(
        None,
        description="Full-mode training on several devices at once, one process each under torch.distributed "
        "(DistributedDataParallel): cuda:0,cuda:1 (GPUs by index), a GPU count (2) or all; cpu,cpu runs CPU processes "
        "(tests). One device: full mode trains there. Empty: full mode trains on `device`. Quick mode is one process.",
    )
    default_arch: str | None = Field(
        None,
        description="timm architecture of a new model lineage. Empty: it follows the weights (resnet18 with timm hub "
        "weights when they are cached or reachable, else the bundled ImageNet EfficientNet-Lite0).",
    )
    image_size: int = Field(224, ge=16)
    pretrained: Literal["auto", "file", "hub", "bundled", "none"] = Field(
        "auto",
        description="auto: the local file if set, else the timm hub if cached or reachable, else the bundled "
        "ImageNet backbone, else random init (with a notice). The other values insist on one source.",
    )
    pretrained_file: Path | None = Field(None, description="Local .safetensors weights for the backbone.")
    promote_policy: Literal["if_not_worse", "always", "manual"] = "if_not_worse"
    label_check_folds: int = Field(
        5,
        ge=0,
        description="K of the K-fold heads that check every label after each retrain (0: no label checks).",
    )
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="A running job silent this long is failed.")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    worker_poll_s: float = Field(1.0, gt=0)
    worker_idle_exit_s: float = Field(
        300.0, ge=0, description="A worker started by the UI (ensure_worker) exits after this long without a job."
    )
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much the training worker lowers its CPU priority (a nice increment, as `nice -n`): on a "
        "machine it shares with the app server, people's clicks get the cores before training does, and training "
        "still gets every idle cycle. 0 keeps the priority it was started with.",
    )

    default_actor: str = "staff"
    auth: Literal["builtin", "none"] = Field(
        "builtin",
        description="builtin: every person signs in (built-in accounts, or OIDC when .streamlit/secrets.toml has an "
        "[auth] section) and roles are enforced in core. none: no sign-in and every caller is an admin; for a "
        "single-person laptop only, and every page says so.",
    )
    session_hours: float = Field(12.0, gt=0, description="A browser sign-in expires after this many hours.")
    login_max_failures: int = Field(
        5, ge=1, description="Failed sign-ins for one name (or 4x this from one address) before a lockout."
    )
    login_lockout_minutes: float = Field(15.0, gt=0, description="How long failed sign-ins are counted and locked out.")
    review_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Keyboard review keys pinned to categories, e.g. Shoes=s,Bags=b (a digit, or a letter but c, r "
        "and u; names as on the Categories page, case aside). The other categories take the free keys; each person "
        "can change the keys for their own session.",
    )
    server_files_dir: Path | None = Field(
        None,
        description="The only server folder the web pages may import from or export to (default: data_dir/exchange). "
        "The command line is not limited by it.",
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative shares summing to 1, got {value}")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device_name(cls, value: object) -> object:
        text = value.strip().lower() if isinstance(value, str) else value
        if not isinstance(text, str) or not DEVICE_NAME.fullmatch(text):
            raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda, cuda:N (a GPU index, e.g. cuda:1) or mps")
        return text

    @field_validator("train_devices", mode="before")
    @classmethod
    def _train_devices(cls, value: object) -> object:
        if value is None or isinstance(value, bool) or not isinstance(value, str | int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        if not text:
            return None
        if not TRAIN_DEVICES.fullmatch(text):
            raise ValueError(
                f"unknown train devices {value!r}: use a list such as cuda:0,cuda:1 or cpu,cpu, a GPU count such as 2, "
                "or all"
            )
        return text

    @field_validator("review_keys", mode="before")
    @classmethod
    def _review_keys(cls, value: object) -> object:
        return parse_review_keys(value) if isinstance(value, str) else value

    @field_validator("default_arch", mode="before")
    @classmethod
    def _arch_or_auto(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "auto") else value

    @field_validator("pretrained_file", mode="before")
    @classmethod
    def _file_or_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'prodcat.sqlite3'}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def thumbs_dir(self) -> Path:
        return self.data_dir / "thumbs"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def exchange_dir(self) -> Path:
        return (self.server_files_dir or self.data_dir / "exchange").expanduser().resolve()

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"


def parse_review_keys(text: str) -> dict[str, str]:
    """`Shoes=s, Bags=B` -> {"Shoes": "s", "Bags": "b"}; a key used twice, one keyboard review cannot give, or an
    entry without a name is refused (ValueError) naming it, so a typo stops the app at start, not mid-review."""
    pins: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, equals, key = (part.strip() for part in entry.rpartition("="))
        key = key.lower()
        if not equals or not name:
            raise ValueError(f"review_keys entry {entry!r}: write CATEGORY=KEY, e.g. Shoes=s")
        if len(key) != 1 or key not in REVIEW_HOTKEYS:
            raise ValueError(f"review_keys entry {entry!r}: the key must be a digit or a letter other than c, r and u")
        if taken := next((other for other, k in pins.items() if k == key), None):
            raise ValueError(f"review_keys: the key {key!r} is given to both {taken!r} and {name!r}")
        if any(other.casefold() == name.casefold() for other in pins):
            raise ValueError(f"review_keys: {name!r} is given two keys")
        pins[name] = key
    return pins


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests call `get_settings.cache_clear()` after changing the environment)."""
    return Settings()
