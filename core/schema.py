"""The database tables (SQLAlchemy 2.x typed ORM). Alembic migrations in core/migrations mirror this file."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the database is UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, always hands back timezone-aware datetimes (SQLite keeps no zone of its own)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


class Split(enum.StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VersionStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class LabelAction(enum.StrEnum):
    """What one label event records (`label_events.action`). Stored as its value, e.g. "delete-category"."""

    SET = "set"  # a person chose an image's category
    CLEAR = "clear"  # a person made an image unlabelled
    BULK = "bulk"  # one image of a bulk change (bulk relabel, accepted predictions); batch_id names the batch
    CONFIRM = "confirm"  # a person kept the label shown (old = new): not a change
    SKIP = "skip"  # a person set the image aside in keyboard review (old = new): not a change
    UNDO = "undo"  # took back the event undoes_event_id names
    IMPORT = "import"  # labelled at import (folder name, chosen category or labels CSV)
    RENAME = "rename"  # the category was renamed (old = new id, the note names both names)
    MERGE = "merge"  # the label moved with its category's merge into another
    DELETE_CATEGORY = "delete-category"  # the label moved when its category was deleted


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column(default=None)
    merged_into_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"), default=None)
    # Set (with archived_at) when a category that audit rows or model versions still name is deleted; its name then
    # reads "<name> (deleted #<id>)". core.catalog.labels.delete_category.
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)


SKU_MAX_LENGTH = 64  # images.sku column width; core.catalog.labels.clean_sku refuses longer ones


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    stored_path: Mapped[str] = mapped_column(String(300))  # relative to data_dir
    thumb_path: Mapped[str] = mapped_column(String(300))  # relative to data_dir
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    file_size: Mapped[int] = mapped_column(Integer)
    original_name: Mapped[str] = mapped_column(String(500))
    source: Mapped[str] = mapped_column(String(500), default="")
    split: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    uploaded_by: Mapped[str] = mapped_column(String(200))
    # core.catalog.imaging.difference_hash of the normalised picture: near-duplicates share it, and then share a split.
    phash: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # core.catalog.imaging.content_hashes of the picture's content box (signed 64-bit each; NULL: not computed yet, or a
    # picture without structure). Near-duplicates are within a small Hamming distance
    # (core.catalog.duplicates.MatchRule).
    box_dhash_h: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=None)
    box_dhash_v: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=None)
    box_phash: Mapped[int | None] = mapped_column(BigInteger, nullable=True, default=None)
    # The near-duplicate group (core.catalog.duplicates): the id of the group's earliest image; NULL: in no group. Set
    # at ingest when a new image matches stored ones, and for the whole catalogue by `duplicates scan`.
    duplicate_group_id: Mapped[int | None] = mapped_column(Integer, nullable=True, default=None)
    # Whether duplicate_group_id is known: True from ingest and from a scan; False for images from before migration
    # 0006 (and originals the scan could not read) until `duplicates scan` has grouped them.
    duplicates_checked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The catalogue's stock-keeping unit for the product shown (labels CSV `sku` column, `images set-sku`); NULL: none.
    # Not unique: several photos show one product. Searched exactly and by prefix (core.views.review.search_condition).
    sku: Mapped[str | None] = mapped_column(String(SKU_MAX_LENGTH), nullable=True, default=None)

    label: Mapped[Label | None] = relationship(back_populates="image", uselist=False)

    __table_args__ = (
        Index("ix_images_split_id", "split", "id"),
        Index("ix_images_created_at", "created_at"),
        Index("ix_images_phash", "phash"),
        # Covers the grouped images' per-group sizes and splits (core.catalog.duplicates counts and pages) without the
        # table.
        Index("ix_images_duplicate_group", "duplicate_group_id", "split"),
        Index("ix_images_duplicates_checked", "duplicates_checked"),
        Index("ix_images_sku", "sku"),
    )


class Label(Base):
    """The current human label of an image. No row means unlabelled."""

    __tablename__ = "labels"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    labelled_by: Mapped[str] = mapped_column(String(200))
    labelled_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="label")
    category: Mapped[Category] = relationship()

    __table_args__ = (Index("ix_labels_category_id", "category_id", "image_id"),)


class LabelEvent(Base):
    """Append-only audit trail: every change of a label, with who, when, why and what the model had said."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    old_category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"))
    new_category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"))
    actor: Mapped[str] = mapped_column(String(200))
    # A VARCHAR holding the value (no database enum type or CHECK, so a new action needs no table rebuild); a string
    # that is no LabelAction is refused before it is written.
    action: Mapped[LabelAction] = mapped_column(
        Enum(
            LabelAction,
            native_enum=False,
            length=32,
            validate_strings=True,
            values_callable=lambda actions: [a.value for a in actions],
        )
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")  # for people: what the columns say, in words
    # The prediction the person saw when they made the change (all optional).
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    predicted_category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"), default=None)
    predicted_confidence: Mapped[float | None] = mapped_column(Float, default=None)
    # An undo event: the event it took back (an earlier event of the same image). NULL on every other action.
    undoes_event_id: Mapped[int | None] = mapped_column(
        ForeignKey("label_events.id", name="fk_label_events_undoes_event_id"), default=None
    )
    # The events one change wrote together share it: a bulk relabel or accepted predictions (undone as one step), the
    # undo of such a batch, a rename, merge or category delete. NULL for a change of one image.
    batch_id: Mapped[str | None] = mapped_column(String(32), default=None)

    __table_args__ = (
        Index("ix_label_events_image_id", "image_id", "id"),
        Index("ix_label_events_created_at", "created_at"),
        # Undo walks one actor's events newest first while it holds the write lock.
        Index("ix_label_events_actor_id", "actor", "id"),
        # Whether an event was undone (undo, corrections), and a batch's events (undo of a bulk change).
        Index("ix_label_events_undoes_event_id", "undoes_event_id"),
        Index("ix_label_events_batch_id", "batch_id"),
    )


class ImageEvent(Base):
    """Append-only record of what happened to an image row itself (today: its deletion). No foreign key on purpose:
    the row outlives the image it describes, so a deleted duplicate can still be traced (name, bytes hash, label)."""

    __tablename__ = "image_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    original_name: Mapped[str] = mapped_column(String(500))
    action: Mapped[str] = mapped_column(String(32))  # delete
    actor: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_image_events_image_id", "image_id", "id"),)


class Prediction(Base):
    """One model version's output for one image: top category, confidence and the full probability vector."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"))
    confidence: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)  # top-1 minus top-2 probability
    entropy: Mapped[float] = mapped_column(Float)
    probs: Mapped[list[Any]] = mapped_column(JSON)  # in the model version's class order
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", name="uq_predictions_image_version"),
        Index("ix_predictions_version_confidence", "model_version_id", "confidence"),
        Index("ix_predictions_version_margin", "model_version_id", "margin"),
        Index("ix_predictions_version_entropy", "model_version_id", "entropy"),
        Index("ix_predictions_version_category", "model_version_id", "category_id"),
    )


class ImageCheck(Base):
    """What one model version's label check found for one image, from out-of-sample (K-fold) probabilities.

    Written after every retrain for every image: labelled ones get the label's quality (cleanlab, low = likely
    wrong), whether confident learning counts it as a label issue, and the category it probably should have;
    every image gets an outlier score (distance to its nearest labelled images in feature space).
    """

    __tablename__ = "image_checks"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    # The label the check scored (NULL: unlabelled then). A label changed since is a person's newer word.
    label_category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"), default=None)
    label_quality: Mapped[float | None] = mapped_column(Float, default=None)
    label_issue: Mapped[bool] = mapped_column(Boolean, default=False)
    suggested_category_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"), default=None)
    suggested_probability: Mapped[float | None] = mapped_column(Float, default=None)
    outlier_score: Mapped[float | None] = mapped_column(Float, default=None)  # higher = less like anything labelled
    probs: Mapped[list[Any] | None] = mapped_column(JSON, default=None)  # out-of-sample, in the version's class order

    __table_args__ = (
        UniqueConstraint("image_id", "model_version_id", name="uq_image_checks_image_version"),
        Index("ix_image_checks_version_quality", "model_version_id", "label_quality"),
        Index("ix_image_checks_version_outlier", "model_version_id", "outlier_score"),
        Index("ix_image_checks_version_issue", "model_version_id", "label_issue"),
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    arch: Mapped[str] = mapped_column(String(100))
    image_size: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str] = mapped_column(String(16))  # quick or full
    class_names: Mapped[list[Any]] = mapped_column(JSON)  # ordered, as at training time
    class_category_ids: Mapped[list[Any]] = mapped_column(JSON)  # same order as class_names
    weights_path: Mapped[str] = mapped_column(String(300))  # relative to data_dir, .safetensors (+ .json sidecar)
    pretrained_source: Mapped[str] = mapped_column(String(300))  # "hub", "file:<name>", "none"
    temperature: Mapped[float] = mapped_column(Float, default=1.0)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.CANDIDATE)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {"train":..., "val":..., "test":...}
    test_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    test_image_ids_hash: Mapped[str] = mapped_column(String(64), default="")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id", use_alter=True), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (Index("ix_model_versions_status", "status"),)


class TrainingJob(Base):
    __tablename__ = "training_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    mode: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    # 1 while queued or running, NULL otherwise: the unique constraint admits one live job at a time,
    # so two people pressing "retrain" at the same moment cannot both enqueue.
    active_slot: Mapped[int | None] = mapped_column(Integer, unique=True, default=1)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str] = mapped_column(Text, default="")
    requested_by: Mapped[str] = mapped_column(String(200))
    worker_id: Mapped[str] = mapped_column(String(200), default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), default=None)

    __table_args__ = (Index("ix_training_jobs_status", "status", "id"),)


class Worker(Base):
    """A live worker process announces itself here; the UI starts one only when no heartbeat is fresh."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:random
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(50), default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    # core.jobs.processes.process_tag() of the registered process: lets this machine see at once that it was killed.
    process: Mapped[str] = mapped_column(String(200), default="", server_default="")


class Account(Base):
    """A person who signs in (built-in password, or an OIDC identity whose e-mail is the name) with one role."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # core.auth.Role
    password_hash: Mapped[str | None] = mapped_column(String(300), default=None)  # argon2id; NULL: OIDC only
    disabled_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiToken(Base):
    """A bearer token for another system: stored as its SHA-256 (the secret is shown once), scoped to a role."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random secret, the row its SHA-256 and when it stops being valid."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class LoginAttempt(Base):
    """One sign-in attempt (by name and client address): failed ones rate-limit further attempts."""

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    client: Mapped[str] = mapped_column(String(100), default="")
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_login_attempts_name_at", "name", "created_at"),
        Index("ix_login_attempts_client_at", "client", "created_at"),
    )


class AuditEvent(Base):
    """Append-only record of every state-changing action that is not a label change (those are label_events):
    categories, model versions, jobs, exports, server folders, weights, accounts and tokens. `actor` is the account."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(40))  # core.auth.Action
    subject: Mapped[str] = mapped_column(String(300), default="")  # e.g. "category 3", "model version 7"
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_audit_events_created_at", "created_at"),)


class MetaValue(Base):
    """Facts about the database itself, one per key: `catalogue_id` (core.catalogue_identity)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
