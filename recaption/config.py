"""Run configuration: one YAML file describes a whole run, validated on load.

A config has a ``run_dir`` and one section per stage. Every section is a strict pydantic
model: an unknown key, a wrong type or a missing value stops with a :class:`ConfigError`
that names the file, the dotted key path and what is expected.

Each section may list ``operational_keys``: settings that change how fast a stage runs but
not what it writes (process counts, batch sizes). They are left out of the section's
fingerprint, so changing them never blocks a resume.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recaption.caption_rules import (
    DEFAULT_REFUSAL_PHRASES,
    BoilerplateOpeningRewriter,
    RefusalFilter,
)

STAGE_NAMES: tuple[str, ...] = ("download", "caption", "filter", "merge", "train", "sample")


class ConfigError(ValueError):
    """A config file or override that cannot be used, with a message a user can act on."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    operational_keys: ClassVar[frozenset[str]] = frozenset()

    def fingerprint_dict(self) -> dict[str, Any]:
        """The section as plain JSON data, without keys that do not change outputs."""
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in self.operational_keys}


class DemoConfig(Section):
    """The built-in demo world: procedurally drawn images served on 127.0.0.1."""

    enabled: bool = False
    n_images: int = Field(400, ge=10, description="How many metadata rows the world has.")
    seed: int = 0
    world_dir: Path | None = Field(
        None, description="Where the world is generated; default run_dir/demo_world."
    )
    models_dir: Path | None = Field(
        None, description="Where tiny demo models are built; default run_dir/demo_models."
    )


class DownloadConfig(Section):
    """Pre-filter LAION-style metadata with pyarrow, then download with img2dataset."""

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {"processes", "threads", "distributor", "spark_master", "min_success_rate"}
    )

    metadata: list[str] = Field(
        default_factory=list,
        description="Metadata parquet files, folders of them, or glob patterns.",
    )
    blocklist: list[str] = Field(
        default_factory=list,
        description="Text files, one URL or metadata hash a line (# comments): matching rows "
        "are dropped by the pre-filter and counted (rule 'blocklist').",
    )
    hash_col: str = Field(
        "hash", description="Metadata column that blocklist hashes are matched against."
    )
    url_col: str = "URL"
    caption_col: str = "TEXT"
    width_col: str = "WIDTH"
    height_col: str = "HEIGHT"
    aesthetic_col: str = "AESTHETIC_SCORE"
    punsafe_col: str = "punsafe"
    pwatermark_col: str = "pwatermark"
    save_additional_columns: list[str] = Field(
        default_factory=lambda: [
            "WIDTH",
            "HEIGHT",
            "similarity",
            "hash",
            "punsafe",
            "pwatermark",
            "AESTHETIC_SCORE",
        ],
        description="Metadata columns carried into every sample's json and parquet row.",
    )
    min_aesthetic_score: float | None = Field(6.0, description="Keep rows scoring >= this.")
    min_width: int = Field(0, ge=0)
    min_height: int = Field(0, ge=0)
    max_punsafe: float | None = Field(0.5, description="Drop rows with punsafe above this.")
    max_pwatermark: float | None = Field(0.8, description="Drop rows with pwatermark above this.")
    allow_loopback: bool = Field(
        False,
        description="Allow downloads from this machine (127.0.0.0/8, ::1, localhost): the demo's "
        "server. Checked on the resolved address of every connection and redirect.",
    )
    allow_private_networks: bool = Field(
        False,
        description="Allow private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local "
        "(169.254/16: cloud metadata) and other non-public addresses. Never for LAION.",
    )
    image_size: int = Field(1024, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = (
        "keep_ratio"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(10000, gt=0)
    processes: int = Field(16, gt=0)
    threads: int = Field(64, gt=0)
    timeout: float = Field(
        10, gt=0, allow_inf_nan=False, description="Seconds before one URL is given up."
    )
    retries: int = Field(0, ge=0)
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    user_agent_token: str | None = "recaption"
    distributor: Literal["multiprocessing", "pyspark", "ray"] = Field(
        "multiprocessing",
        description="img2dataset distributor. multiprocessing: this node. pyspark: a local "
        "Spark session on this node unless download.spark_master names a Spark cluster.",
    )
    spark_master: str | None = Field(
        None,
        description="With distributor pyspark: the master URL of a running Spark cluster "
        "(spark://HOST:7077); the download then runs on its workers.",
    )
    min_success_rate: float = Field(
        0.5, ge=0, le=1, description="Warn loudly when fewer downloads than this succeed."
    )

    def fingerprint_dict(self) -> dict[str, Any]:
        """As for every section, minus the blocklist keys while no blocklist is set (so
        adding these keys left the fingerprint of runs without a blocklist unchanged); the
        download stage adds the blocklist's content digest."""
        data = super().fingerprint_dict()
        if not self.blocklist:
            data.pop("blocklist", None)
            data.pop("hash_col", None)
        return data

    @model_validator(mode="after")
    def _spark_master_needs_pyspark(self) -> DownloadConfig:
        if self.spark_master is not None and self.distributor != "pyspark":
            raise ValueError(
                f"download.spark_master is set ({self.spark_master!r}) but download.distributor "
                f"is {self.distributor!r}; set download.distributor: pyspark to download on "
                "the Spark cluster, or remove download.spark_master"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def refuse_removed_keys(cls, data: Any) -> Any:
        """``allow_private_hosts`` was split in two; say which new key to set."""
        if isinstance(data, dict) and "allow_private_hosts" in data:
            raise ValueError(
                "download.allow_private_hosts was removed: set download.allow_loopback: true "
                "to download from this machine (the demo's server on 127.0.0.1), and "
                "download.allow_private_networks: true only to download from private or "
                "link-local networks (10.0.0.0/8, 192.168.0.0/16, 169.254.0.0/16, ...)"
            )
        return data


class CaptionConfig(Section):
    """LLaVA captioning of every downloaded image (``recaption caption``).

    ``backend: transformers`` runs the model in the stage's process; ``backend: openai`` sends
    each image to an OpenAI-compatible server (vLLM, SGLang, ``transformers serve``), either
    running at ``endpoint`` or started by the stage from ``server.command``.
    """

    class ServerConfig(Section):
        """A server the caption stage starts itself (``backend: openai``), and stops."""

        command: str | None = Field(
            None,
            description="Command that starts an OpenAI-compatible server; {port} is required, "
            "{host}, {model} (caption.model as a hub id or folder) and {gpus} (GPUs visible to "
            "the task) are filled in, e.g. 'vllm serve {model} --port {port} "
            "--data-parallel-size {gpus}'.",
        )
        host: str = Field("127.0.0.1", description="Address the server listens on and is asked at.")
        port: int | None = Field(None, ge=1, le=65535, description="Default: a free port.")
        startup_timeout: float = Field(
            1200, gt=0, allow_inf_nan=False, description="Seconds to wait for /v1/models."
        )
        stop_timeout: float = Field(
            60, gt=0, allow_inf_nan=False, description="Seconds from SIGTERM to SIGKILL."
        )

        @model_validator(mode="before")
        @classmethod
        def _no_key_in_command(cls, data: Any) -> Any:
            """Refuse ``--api-key`` in the command without echoing it into the error."""
            from recaption.serving import KEY_IN_COMMAND_PROBLEM, passes_api_key

            command = data.get("command") if isinstance(data, dict) else None
            if isinstance(command, str) and passes_api_key(command):
                raise ValueError(f"caption.server.command {KEY_IN_COMMAND_PROBLEM}")
            return data

        @field_validator("command")
        @classmethod
        def _command_usable(cls, value: str | None) -> str | None:
            from recaption.serving import command_problem

            if value is None:
                return None
            problem = command_problem(value)
            if problem:
                raise ValueError(f"the server command {problem}")
            return value

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {
            "batch_size",
            "num_workers",
            "checkpoint_every_batches",
            "device",
            "endpoint",
            "api_key_env",
            "concurrency",
            "request_timeout",
            "max_retries",
            "retry_backoff",
            "max_request_error_rate",
            "server",
        }
    )
    # Keys that only the openai backend reads: left out of a transformers run's fingerprint.
    openai_keys: ClassVar[frozenset[str]] = frozenset({"backend", "request_image_side"})

    model: str = Field(
        "llava-hf/llava-1.5-7b-hf",
        description="Hub id, local folder, or demo:NAME (a demo model: trained and shipped, "
        "or tiny and random, built on first use).",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit of the model.")
    trust_remote_code: bool = Field(False, description="Run the checkpoint's own Python code.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 (float16 if unsupported) on GPU, float32 on CPU."
    )
    device: str | None = Field(None, description="Default: cuda:$LOCAL_RANK if CUDA, else cpu.")
    prompt: Literal["dense", "short", "custom"] = Field(
        "dense",
        description="dense: 'Describe this image and its style in a very detailed manner.' "
        "(KOALA/PixArt); short: one sentence; custom: caption.custom_prompt.",
    )
    custom_prompt: str | None = Field(
        None, description="Instruction for prompt=custom; {alt_text} becomes the original text."
    )
    max_alt_text_chars: int = Field(
        300, ge=0, description="Longest original text put into a custom prompt (characters)."
    )
    batch_size: int = Field(16, gt=0, description="Images per generate() call.")
    num_workers: int = Field(4, ge=0, description="DataLoader processes decoding images.")
    checkpoint_every_batches: int = Field(
        50,
        gt=0,
        description="transformers backend: save the shard's captions so far every N batches, "
        "so an interrupted shard resumes there instead of from its start.",
    )
    max_new_tokens: int = Field(256, gt=0)
    min_new_tokens: int | None = Field(None, ge=0)
    do_sample: bool = Field(False, description="False: greedy decoding (deterministic).")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = Field(0, description="Sampling seed; each batch draws from seed, shard, batch.")
    min_image_side: int = Field(
        8, ge=1, description="Images with a shorter side are recorded as errors."
    )
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Larger images are refused unread (decompression bombs)."
    )
    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        description="transformers: generate() in this process; openai: requests to an "
        "OpenAI-compatible server (vLLM, SGLang, transformers serve).",
    )
    endpoint: str | None = Field(
        None,
        description="openai: base URL of a running server, e.g. http://127.0.0.1:8000/v1 "
        "(or caption.server.command to start one).",
    )
    api_key_env: str | None = Field(
        None,
        description="openai: name of the environment variable that holds the server's API key "
        "(the key itself is never written in the config, a log or an output).",
    )
    concurrency: int = Field(32, gt=0, description="openai: requests in flight at once.")
    request_timeout: float = Field(
        600, gt=0, allow_inf_nan=False, description="openai: seconds one request may take."
    )
    max_retries: int = Field(
        4, ge=0, description="openai: retries of a request after a timeout, 429 or 5xx."
    )
    retry_backoff: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="openai: first retry wait (s), then doubled."
    )
    max_request_error_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="openai: a shard whose failed requests exceed this share fails (a rerun "
        "retries it); below it each failed request is an error row.",
    )
    request_image_side: int | None = Field(
        None,
        gt=0,
        description="openai: images are sent with their shorter side brought down to this; "
        "default: the model's input side from its image processor (336 for LLaVA-1.5).",
    )
    server: ServerConfig = Field(
        default_factory=ServerConfig,
        description="openai: a server the stage starts and stops; keys caption.server.command, "
        ".host, .port, .startup_timeout, .stop_timeout.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_credentials_in_endpoint(cls, data: Any) -> Any:
        """Refuse ``user:password@`` in the endpoint without echoing it into the error."""
        from recaption.serving import CREDENTIALS_PROBLEM, has_credentials

        endpoint = data.get("endpoint") if isinstance(data, dict) else None
        if isinstance(endpoint, str) and has_credentials(endpoint):
            raise ValueError(f"caption.endpoint {CREDENTIALS_PROBLEM}")
        return data

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        from recaption.serving import endpoint_problem

        if value is None:
            return None
        problem = endpoint_problem(value)
        if problem:
            raise ValueError(f"the endpoint {problem}")
        return value.strip().rstrip("/")

    @model_validator(mode="after")
    def _openai_has_a_server(self) -> CaptionConfig:
        """The openai backend needs exactly one server: a running one or a command."""
        if self.backend != "openai":
            return self
        if self.endpoint is None and not self.server.command:
            raise ValueError(
                "caption.backend is 'openai' but neither caption.endpoint (a running server, "
                "e.g. http://127.0.0.1:8000/v1) nor caption.server.command (one the stage "
                "starts, e.g. 'vllm serve llava-hf/llava-1.5-7b-hf --port {port}') is set"
            )
        if self.endpoint is not None and self.server.command:
            raise ValueError(
                "caption.endpoint and caption.server.command are both set; keep one: the "
                "endpoint of a running server, or the command that starts one "
                "(caption.server.command=null to use the endpoint)"
            )
        return self

    def fingerprint_dict(self) -> dict[str, Any]:
        """As for every section; a transformers run leaves out the openai-only keys, so its
        fingerprint is what it was before the openai backend existed."""
        data = super().fingerprint_dict()
        if self.backend == "transformers":
            data = {k: v for k, v in data.items() if k not in self.openai_keys}
        return data


class FilterConfig(Section):
    """Rules that keep, clean or reject each synthetic caption (recaption.caption_rules)."""

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {"clip_batch_size", "clip_device", "clip_wait_seconds"}
    )

    min_words: int = Field(5, ge=0)
    max_words: int = Field(300, gt=0)
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(3000, gt=0)
    truncated: Literal["trim", "drop"] = Field(
        "trim", description="finish_reason=length: trim to the last full sentence, or drop."
    )
    ngram_size: int = Field(3, gt=0)
    max_duplicate_ngram_fraction: float = Field(0.3, ge=0, le=1)
    max_tail_repeats: int = Field(3, ge=2, description="A phrase repeated this often at the end.")
    refusal_phrases: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PHRASES),
        description="Case-insensitive phrases that mark a refusal or meta-text.",
    )
    boilerplate: Literal["rewrite", "keep", "drop"] = "rewrite"
    boilerplate_openings: list[str] | None = Field(
        None, description="Regexes of openings to rewrite; default: the built-in list."
    )
    keep_languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="ISO 639-1 codes to keep; an empty list turns the language rule off.",
    )
    candidate_languages: list[str] = Field(
        default_factory=lambda: ["en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja", "ar"],
        description="Languages lingua chooses among (fewer is faster).",
    )
    min_language_confidence: float = Field(0.5, ge=0, le=1)
    max_duplicate_copies: int | None = Field(
        3, ge=1, description="Reject captions repeated on more images than this; null: off."
    )
    text_tokens: Literal["trim", "drop", "keep", "off"] = Field(
        "trim",
        description="Captions longer than max_text_tokens: trim to the last whole sentence "
        "that fits, drop, or keep (training truncates them); off: not measured.",
    )
    max_text_tokens: int = Field(
        77,
        gt=2,
        description="The text encoders' context: CLIP reads 77 tokens, start/end included.",
    )
    text_tokenizer: str | None = Field(
        None,
        description="Tokenizer measuring captions (hub id or folder; an SDXL pipeline's "
        "tokenizer/ is used); null: train.teacher's.",
    )
    clip_model: str | None = Field(
        None, description="CLIP hub id, folder or demo:tiny-clip; null turns CLIP scoring off."
    )
    clip_revision: str | None = None
    min_clip_score: float | None = Field(None, description="Reject below this CLIP score.")
    min_clip_percentile: float | None = Field(
        None, ge=0, le=100, description="Reject below this percentile of the run's CLIP scores."
    )
    clip_batch_size: int = Field(64, gt=0)
    clip_device: str | None = None
    clip_wait_seconds: float = Field(
        3600, ge=0, description="Multi-rank percentile: how long to wait for other ranks' scores."
    )

    @field_validator("boilerplate_openings", "refusal_phrases")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None, info: Any) -> list[str] | None:
        """Build the rules' regular expressions now, so a bad one stops at load, not mid-run."""
        if value is None:
            return value
        if info.field_name == "refusal_phrases":
            too_long = [p for p in value if len(p) > MAX_REFUSAL_PHRASE_CHARS]
            if too_long:
                raise ValueError(
                    f"refusal phrase {_short(too_long[0], 60)} has {len(too_long[0])} "
                    f"characters; a phrase is at most {MAX_REFUSAL_PHRASE_CHARS}"
                )
            RefusalFilter(phrases=value)  # literal phrases, escaped: always compiles
            return value
        for i, opening in enumerate(value):
            try:
                re.compile(opening)
            except re.error as exc:
                raise ValueError(
                    f"item {i}, {_short(opening, 60)}, is not a valid regular expression "
                    f"({exc.msg} at position {exc.pos}); openings are regexes: write \\( \\[ "
                    "\\. \\* \\? for the literal characters"
                ) from None
        try:
            BoilerplateOpeningRewriter(openings=value)
        except re.error as exc:
            raise ValueError(
                f"the openings do not combine into one regular expression ({exc.msg}); "
                "inline flags such as (?i) are not allowed (matching is case-insensitive)"
            ) from None
        return value


class MergeConfig(Section):
    """Join images, captions and filter decisions into publishable and trainable outputs."""

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {"pretty_name", "source_description", "report_examples", "min_done_fraction"}
    )

    embed_images_in_parquet: bool = False
    min_done_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of the run's shards that must come through every stage for a "
        "SLURM chain to go on; shards that still fail after the jobs' retries are left out "
        "(listed by `recaption status` and the card). 1.0: any failure stops the chain.",
    )
    pretty_name: str = Field("recaption dataset", description="Title of the dataset card.")
    source_description: str = Field(
        "LAION-style image URL and alt-text metadata (e.g. LAION-Aesthetics V2 6+)",
        description="Where the metadata came from, for the dataset card.",
    )
    report_examples: int = Field(12, ge=0, description="Example images in the report grid.")


class TrainConfig(Section):
    """KOALA distillation from an SDXL teacher (accelerate; resumes from its checkpoints).

    Defaults follow the KOALA paper where it gives them (loss weights 1.0, AdamW, 1024px,
    synthetic captions only as for KOALA-LLaVA-Caption). ``max_steps`` is operational so a
    finished run can be extended; the LR schedule is stretched to the new length.
    """

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {
            "max_steps",
            "num_workers",
            "gradient_checkpointing",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "log_every",
            "report_to",
            "cpu_threads",
            "global_batch_size",
        }
    )

    teacher: str = Field(
        "stabilityai/stable-diffusion-xl-base-1.0",
        description="SDXL pipeline: hub id, local folder or demo:tiny-sdxl.",
    )
    teacher_revision: str | None = None
    teacher_variant: str | None = Field(None, description="e.g. fp16 for the hub's fp16 files.")
    teacher_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    preset: Literal["koala-700m", "koala-1b"] = "koala-700m"
    resolution: int = Field(1024, gt=0, description="Square training size in pixels.")
    center_crop: bool = Field(False, description="Centre crop instead of a random crop.")
    random_flip: bool = False
    synthetic_caption_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of samples trained on the synthetic caption; the others use the "
        "original alt-text (1.0: KOALA-LLaVA-Caption; DALL-E 3 used 0.95, SD3 0.5). In a mix, "
        "a sample without alt-text uses its synthetic caption; at 0 (the alt-text baseline) "
        "it trains on the empty prompt.",
    )
    empty_prompt_ratio: float = Field(
        0.1, ge=0, le=1, description="Share of empty prompts (classifier-free guidance)."
    )
    cache: bool = Field(
        False,
        description="Train from run_dir/cache (`recaption encode`): VAE latents and text "
        "embeddings computed once; the VAE encoder and text encoders are not loaded.",
    )
    cache_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="How `recaption encode` stores latents and embeddings."
    )
    batch_size: int = Field(8, gt=0, description="Samples per process per micro-batch.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="The recipe's global batch (batch_size x processes x "
        "gradient_accumulation_steps); jobs/submit.sh refuses a training job that would "
        "train with another. null: not checked.",
    )
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = (
        "constant_with_warmup"
    )
    lr_warmup_steps: int = Field(500, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    task_loss_weight: float = Field(1.0, ge=0, description="MSE(student eps, noise).")
    output_kd_weight: float = Field(1.0, ge=0, description="MSE(student eps, teacher eps).")
    feature_kd_weight: float = Field(
        1.0, ge=0, description="Sum of self-attention (attn1) feature MSEs."
    )
    noise_offset: float = Field(
        0.0,
        ge=0,
        description="Offset noise: add this times a per-channel constant to the noise "
        "(diffusers' --noise_offset). Small latents need it: "
        "their noisiest step still shows the image's mean colour.",
    )
    use_ema: bool = True
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    max_steps: int = Field(1000, gt=0, description="Optimizer steps in total.")
    checkpointing_steps: int = Field(1000, gt=0, description="save_state every N steps.")
    checkpoints_total_limit: int | None = Field(3, description="Keep the newest N checkpoints.")
    gradient_checkpointing: bool = False
    num_workers: int = Field(4, ge=0, description="DataLoader workers per process.")
    log_every: int = Field(10, gt=0)
    report_to: Literal["tensorboard"] | None = None
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads per process when training on CPU; null: torch's."
    )
    seed: int = 0


# The negative prompt of KOALA's model card; the sample and evaluate stages' default.
KOALA_NEGATIVE_PROMPT = "worst quality, low quality, illustration, low resolution"
NEGATIVE_PROMPT_HELP = (
    'KOALA\'s negative prompt. "": the unconditional branch a model learnt from empty prompts '
    "(the demo's models, which know no other words)."
)


class SampleConfig(Section):
    """Sampling the trained student (and optionally the teacher), KOALA's published defaults."""

    operational_keys: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "cpu_threads"})

    model: str | None = Field(
        None, description="Pipeline to sample: hub id or folder; default run_dir/koala/pipeline."
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["A portrait painting of a Golden Retriever like Leonard da Vinci"]
    )
    prompts_file: Path | None = Field(
        None, description="Text file, one prompt a line; replaces prompts when set."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], description="Every prompt is sampled once per seed."
    )
    num_inference_steps: int = Field(25, gt=0)
    guidance_scale: float = 7.5
    negative_prompt: str = Field(KOALA_NEGATIVE_PROMPT, description=NEGATIVE_PROMPT_HELP)
    height: int = Field(1024, gt=0)
    width: int = Field(1024, gt=0)
    batch_size: int = Field(4, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    device: str | None = Field(None, description="Default: cuda:$LOCAL_RANK if CUDA, else cpu.")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads when sampling on CPU; null: torch's default."
    )
    with_teacher: bool = Field(
        False, description="Also sample train.teacher with the same prompts and seeds."
    )
    clip_model: str | None = Field(
        None, description="CLIP model scoring each sample, e.g. openai/clip-vit-large-patch14."
    )


class EvaluateConfig(Section):
    """Evaluating the trained student on held-out prompts: CLIP score and judged attributes.

    ``recaption evaluate`` samples the pipeline ``sample`` samples (``sample.model`` or
    ``run_dir/koala/pipeline``) and writes ``run_dir/evaluation/``. A changed setting redoes
    the evaluation (it is a measurement: nothing to protect), so no key needs ``--overwrite``.
    """

    operational_keys: ClassVar[frozenset[str]] = frozenset(
        {"enabled", "batch_size", "device", "cpu_threads"}
    )

    enabled: bool = Field(
        False,
        description="`recaption run` evaluates after sample; `recaption evaluate` runs "
        "whatever this says.",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Held-out prompts. Empty: n_prompts prompts that describe() writes for a "
        "held-out demo world (only meaningful for a model trained on the demo world).",
    )
    n_prompts: int = Field(24, gt=0, description="World prompts drawn when prompts is empty.")
    world_seed: int = Field(
        1_000_000_007,
        description="Seed of the held-out world the prompts describe (far from demo.seed and "
        "the demo models' training worlds); the judge is measured on world_seed + 1.",
    )
    world_prompts: Literal["judged", "all"] = Field(
        "judged",
        description="judged: only world images of the kinds the judge judges (a plain "
        "background and one object); all: every image drawn.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1],
        min_length=1,
        description="Every prompt is sampled once per seed.",
    )
    num_inference_steps: int = Field(25, gt=0)
    guidance_scale: float = 7.5
    negative_prompt: str = Field(KOALA_NEGATIVE_PROMPT, description=NEGATIVE_PROMPT_HELP)
    height: int = Field(1024, gt=0, multiple_of=8, description="Divisible by 8 (the VAE's).")
    width: int = Field(1024, gt=0, multiple_of=8, description="Divisible by 8 (the VAE's).")
    with_teacher: bool = Field(
        False, description="Also evaluate train.teacher on the same prompts and seeds."
    )
    clip_model: str | None = Field(
        "openai/clip-vit-large-patch14",
        description="CLIP checkpoint (hub id, folder or demo:NAME) scoring each sample against "
        "its prompt; null: no CLIP score.",
    )
    judge: Literal["pixel"] | None = Field(
        None,
        description="Attribute judge. pixel: background and main-object colour read from the "
        "demo world's flat palette (recaption/judge.py); null: none.",
    )
    judge_images: int = Field(
        200,
        ge=20,
        description="Held-out world images per attribute on which the judge's own accuracy "
        "is measured.",
    )
    judge_goal: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Judge accuracy an attribute needs for its sample accuracy to be trusted.",
    )
    batch_size: int = Field(4, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: float16 on CUDA, float32 on CPU."
    )
    device: str | None = Field(None, description="Default: cuda:$LOCAL_RANK if CUDA, else cpu.")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads when sampling on CPU; null: torch's default."
    )

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, value: list[str]) -> list[str]:
        for i, prompt in enumerate(value):
            if not prompt.strip():
                raise ValueError(
                    f"prompt {i} is blank; remove it (an empty list means world prompts)"
                )
        return value


class RunConfig(Section):
    """A whole run: the run directory and one section per stage."""

    run_dir: Path = Field(description="The folder that holds every stage's outputs.")
    demo: DemoConfig = Field(default_factory=DemoConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    source: Path | None = Field(None, exclude=True, description="The YAML file it came from.")

    @field_validator("run_dir", mode="before")
    @classmethod
    def _run_dir_given(cls, value: Any) -> Any:
        # Path("") is the current folder: an empty value would silently write there.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "run_dir is empty; set it to the folder that holds the run's outputs, "
                "e.g. run_dir=runs/demo"
            )
        return value

    @field_validator("run_dir")
    @classmethod
    def _run_dir_is_its_own_folder(cls, value: Path) -> Path:
        if "\0" in str(value):
            raise ValueError("run_dir contains a NUL character")
        try:
            resolved = value.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            resolved = Path(os.path.abspath(value))
        try:
            home: Path | None = Path.home().resolve()
        except (OSError, RuntimeError, KeyError):  # no home folder known
            home = None
        if resolved.parent == resolved:
            what = "the filesystem root"
        elif resolved == home:
            what = "your home folder"
        else:
            return value
        raise ValueError(
            f"run_dir {str(value)!r} is {what}; every stage writes its folders (images/, "
            "captions/, ...) into run_dir: give the run a folder of its own, e.g. "
            f"{resolved / 'recaption-runs' / 'demo'}"
        )

    # -- the run directory layout (DESIGN: run_dir/{images,captions,...}) -------------------
    @property
    def images_dir(self) -> Path:
        return self.run_dir / "images"

    @property
    def captions_dir(self) -> Path:
        return self.run_dir / "captions"

    @property
    def filtered_dir(self) -> Path:
        return self.run_dir / "filtered"

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    @property
    def koala_dir(self) -> Path:
        return self.run_dir / "koala"

    @property
    def cache_dir(self) -> Path:
        return self.run_dir / "cache"

    @property
    def samples_dir(self) -> Path:
        return self.run_dir / "samples"

    @property
    def evaluation_dir(self) -> Path:
        return self.run_dir / "evaluation"

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage's done markers (its ``_ledger/`` subfolder holds the rest)."""
        return {
            "download": self.images_dir,
            "caption": self.captions_dir,
            "filter": self.filtered_dir,
            "merge": self.dataset_dir / "webdataset",
            "train": self.koala_dir,
            "encode": self.cache_dir,
            "sample": self.samples_dir,
            "evaluate": self.evaluation_dir,
        }[stage]

    @property
    def demo_world_dir(self) -> Path:
        return self.demo.world_dir or self.run_dir / "demo_world"

    @property
    def demo_models_dir(self) -> Path:
        return self.demo.models_dir or self.run_dir / "demo_models"


def fingerprint(data: Any) -> str:
    """A short, stable hash of JSON-serialisable data (keys sorted)."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# A run config is a small hand-written file; these bound what reading one may cost.
MAX_CONFIG_BYTES = 1 << 20
# Nodes plus scalar characters, every alias expanded: no alias-free file under
# MAX_CONFIG_BYTES comes near it, an alias bomb (a few lines, billions of nodes) goes far over.
MAX_YAML_WEIGHT = 4 * MAX_CONFIG_BYTES
MAX_ERROR_LINES = 30
MAX_REFUSAL_PHRASE_CHARS = 200

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 200
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10
_REPR.maxlevel = 3


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the whole repr."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _YamlTooBigError(ValueError):
    pass


def _yaml_weight(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes plus scalar characters under ``node`` with aliases expanded, memoised per node."""
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, yaml.ScalarNode):
        weight = 1 + len(node.value)
    else:
        if key in active:
            raise _YamlTooBigError("an alias refers to a collection that contains it (a cycle)")
        active.add(key)
        weight = 1
        items = (
            node.value
            if isinstance(node, yaml.SequenceNode)
            else [child for pair in node.value for child in pair]
        )
        for child in items:
            weight += _yaml_weight(child, memo, active)
            if weight > MAX_YAML_WEIGHT:
                raise _YamlTooBigError(
                    "its aliases (*name) expand to more than "
                    f"{MAX_YAML_WEIGHT:,} nodes and characters; a run config needs no such "
                    "repetition: write the values out or use fewer aliases"
                )
        active.discard(key)
    memo[key] = weight
    return weight


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents whose aliases expand beyond reason.

    PyYAML shares an aliased node, so a few lines can describe a value of billions of nodes
    that anything walking it (validation, error messages, fingerprints) never finishes.
    Raises :class:`ConfigError` prefixed with ``source``; ``yaml.YAMLError`` for bad syntax.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _yaml_weight(node, {}, set())
        return loader.construct_document(node)
    except _YamlTooBigError as exc:
        raise ConfigError(f"{source}: refused: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: not valid YAML: {_short(str(exc))}") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=VALUE`` into its key path and a YAML-parsed value.

    The value is YAML (``4``, ``null``, ``[x, y]``, ``{a: 1}``), except where YAML would read
    ordinary text as something else: a mapping or list not written in ``{...}`` or ``[...]``
    (``caption.custom_prompt=Describe: {alt_text}``), or plain text cut at a `` #`` comment,
    stays the text as typed.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {_short(text)}: expected KEY=VALUE, e.g. download.processes=4")
    stripped = raw.strip()
    if not stripped:
        return key.strip().split("."), ""
    try:
        value = _load_yaml(raw, f"override {_short(text)}")
    except yaml.YAMLError:
        return key.strip().split("."), raw
    if (
        (isinstance(value, dict) and not stripped.startswith("{"))
        or (isinstance(value, list) and not stripped.startswith("["))
        or stripped.startswith("#")
    ):
        value = raw  # ordinary text that YAML would read as a mapping, a list or a comment
    elif (
        isinstance(value, str)
        and value != stripped
        and " #" in stripped
        and stripped[0] not in "'\"!&|>"
    ):
        value = raw  # YAML would have dropped the rest as a comment
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``KEY=VALUE`` override into ``data`` (a raw config dict) by its dotted path."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {part!r} is a value, not a section with keys"
                )
            node = child
        node[path[-1]] = value
    return data


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (for listing valid keys)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s)):"]
    errors = err.errors()
    for e in errors[:MAX_ERROR_LINES]:
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            valid = [v for v in valid if v != "source"]
            guess = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            lines.append(f"  - {key}: unknown key.{hint} Valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  - {key}: required value is missing")
        else:
            got = e.get("input")
            shown = _short(got) if not isinstance(got, dict) else "a mapping"
            msg = e["msg"] if len(e["msg"]) <= 500 else e["msg"][:497] + "..."
            lines.append(f"  - {key}: {msg} (got {shown})")
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"  ... and {len(errors) - MAX_ERROR_LINES} more")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config.

    Raises :class:`ConfigError` naming the file and key for every problem found.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{path}: config file not found. Pass the path of a YAML run config, "
            "e.g. configs/demo.yaml"
        )
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; pass the path of a YAML run config file")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: a device or pipe may never end
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // (1 << 20)} MiB; a run config is a small "
            "YAML file (is this the right file?)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "a run config must be UTF-8: save it as UTF-8"
        ) from None
    try:
        data = _load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys (run_dir, download, ...)"
        )
    data = apply_overrides(data, overrides or [])
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(path))) from None
    config.source = path
    if config.run_dir.exists() and not config.run_dir.is_dir():
        raise ConfigError(
            f"{path}: run_dir {str(config.run_dir)!r} exists and is a file; "
            "point run_dir at a folder (it is created if absent)"
        )
    return config
