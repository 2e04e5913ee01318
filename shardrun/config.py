"""JobSpec: the typed, validated job spec. YAML in, resolved YAML out.

The spec is validated once, on the driver, before Ray is started or contacted, and travels to
the workers as a plain dict (`JobSpec.model_dump()`), where it is validated again for free.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardrun.errors import UserError
from shardrun.fs import is_uri, join


class _Section(BaseModel):
    """A spec section: unknown keys are errors, numbers are finite, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED_LIMIT = 2**32
"""Seeds go to numpy's legacy RNG, which takes 0 <= seed < 2**32."""
LONG_TIMEOUT_S = 1800.0
"""torch's and Ray Train's default collective timeout, which shardrun keeps for group start-up and checkpoint
saves (the ranks wait at barriers for the slowest checkpoint writer)."""
NAME_LIMIT = 200
"""Characters of a run name: the longest file names made from it (`<name>.replaced-<time>`, `<name>.json`) stay
within the 255 bytes a file system allows."""
WARMUP_SHARE = 5
"""A warm-up longer than 1/WARMUP_SHARE of run.max_steps gets a warning."""
COMPUTED_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
"""DeepSpeed config keys shardrun computes from the spec and the world size (every size an elastic run takes)."""


class PrepareSpec(_Section):
    source: Literal["python-stdlib"] = Field(
        "python-stdlib", description="Built-in text corpus to turn into token shards."
    )
    max_mb: float = Field(8.0, gt=0, description="Read at most this many MB of source text.")


class HFModelSpec(_Section):
    path: str = Field(
        description="The Hugging Face model: a local folder (config.json, safetensors weights, tokenizer files), "
        "an abfs:// or s3:// URI of one (downloaded once per node), or a Hub id (org/name; HF_HUB_OFFLINE is "
        "honoured).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); also keys the cache.")
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="What the model learns: causal_lm (the next token, over data.format: tokens) or "
        "sequence_classification (a label per row, over data.format: table with an input_ids column, optional "
        "attention_mask and token_type_ids columns, and data.label).",
    )
    num_labels: int | None = Field(
        None, ge=2, description="sequence_classification: the classes; labels are 0 .. num_labels - 1.",
    )
    from_scratch: bool = Field(
        False, description="The architecture of path's config.json with random weights (run.seed), no weights "
        "loaded.",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="The dtype the weights are loaded in; DeepSpeed then casts the module to "
        "deepspeed.precision.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers' attention: sdpa (torch's scaled_dot_product_attention), eager, or "
        "flash_attention_2 (GPUs, with the flash-attn package).",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python from path (a model transformers does not know). It is "
        "code: only for sources you trust.",
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Values set on the model's config before it is built (e.g. "
        "{dropout: 0.1, num_hidden_layers: 2} with from_scratch).",
    )

    @model_validator(mode="after")
    def _labels_for_classification(self) -> HFModelSpec:
        if self.task == "sequence_classification" and self.num_labels is None:
            raise ValueError("model.hf.task sequence_classification needs model.hf.num_labels (the classes)")
        if self.task != "sequence_classification" and self.num_labels is not None:
            raise ValueError("model.hf.num_labels is for task: sequence_classification")
        return self

    @property
    def classifies(self) -> bool:
        return self.task == "sequence_classification"


class LoraSpec(_Section):
    r: int = Field(8, ge=1, description="The adapters' rank: each adapted weight W (out x in) trains B (out x r) "
                   "and A (r x in), and the model computes W + (alpha / r) B A.")
    alpha: float = Field(16.0, gt=0, description="The adapters' scale numerator (alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="The modules that get adapters: names of linear layers (q_proj, v_proj, ...: "
        "a module whose name ends with one of them), or all-linear for every linear layer but the output head.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained fully beside the adapters (e.g. embed_tokens, lm_head); "
        "a classifier's new head (score, classifier) always is.",
    )

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules names at least one module (or is all-linear)")
        return value


class ModelSpec(_Section):
    type: Literal["gpt"] | None = Field(
        None, description="Built-in model. Defaults to gpt when neither an entrypoint nor hf is given."
    )
    hf: HFModelSpec | None = Field(
        None, description="A Hugging Face transformers model instead of the built-in GPT.",
    )
    entrypoint: str | None = Field(
        None,
        description="User model factory 'package.module:function'; it gets model.args as "
        "keyword arguments and returns an nn.Module whose forward(inputs, targets) is the loss. It is code: "
        "`shardrun check` and every worker import and run it.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the entrypoint."
    )
    n_layer: int = Field(4, ge=1, description="GPT: transformer blocks.")
    n_head: int = Field(4, ge=1, description="GPT: attention heads per block.")
    n_embd: int = Field(128, ge=1, description="GPT: width of the residual stream.")
    block_size: int = Field(256, ge=1, description="GPT: longest context in tokens.")
    vocab_size: int = Field(256, ge=2, description="GPT: vocabulary size (256: raw bytes).")
    dropout: float = Field(0.0, ge=0, lt=1, description="GPT: dropout probability.")
    bias: bool = Field(False, description="GPT: biases in linear and norm layers.")
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters (peft) on a model.hf model instead of all its weights: the base "
        "weights stay frozen, checkpoints hold the adapters alone (docs/models.md, \"Fitting a model\").",
    )
    compile: bool = Field(
        False, description="Compile the model with torch.compile through DeepSpeed's engine.compile() (inductor): "
        "the first steps take longer while it compiles, the rest run faster on a GPU. On a CPU it needs a C++ "
        "compiler.",
    )
    activation_checkpointing: bool | int = Field(
        False, description="Recompute blocks' activations in the backward pass instead of keeping them: true for "
        "every block, N for every N-th, false for none. The built-in GPT and model.hf models do it themselves; an "
        "entrypoint model's module provides enable_activation_checkpointing(every) (docs/models.md).",
    )

    @field_validator("activation_checkpointing")
    @classmethod
    def _every_nth(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and value < 0:
            raise ValueError("activation_checkpointing is true, false, or N >= 1 (every N-th block)")
        return value

    @property
    def checkpoint_every(self) -> int:
        """Every how many blocks activations are recomputed (0: none)."""
        return int(self.activation_checkpointing)

    @property
    def adapter_base(self) -> dict | None:
        """With model.lora, what its checkpoints (adapters alone) are trained on and need beside them: the base
        model's path (secrets masked) and revision. None for a run that trains every weight."""
        if self.lora is None or self.hf is None:
            return None
        from shardrun.errors import redact

        return {"path": redact(self.hf.path), "revision": self.hf.revision}

    @property
    def byte_level(self) -> bool:
        """The built-in GPT on raw bytes: its loss in bits is bits per byte."""
        return self.type == "gpt" and self.vocab_size == 256

    @model_validator(mode="after")
    def _one_kind_of_model(self) -> ModelSpec:
        if self.lora is not None and (self.hf is None or self.hf.from_scratch):
            raise ValueError("model.lora adapts the pretrained weights of a model.hf model" + (
                ": with model.hf.from_scratch there are none (train all its weights: drop model.lora)"
                if self.hf is not None else ""))
        if self.hf is not None:
            if self.entrypoint is not None or self.type is not None:
                raise ValueError("give one of model.hf, model.entrypoint and model.type")
            self._no_gpt_fields("model.hf")
            return self
        if self.entrypoint is None:
            if self.args:
                raise ValueError("model.args is only for an entrypoint model")
            if self.type is None:
                object.__setattr__(self, "type", "gpt")
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
                )
            return self
        if self.type is not None:
            raise ValueError("give either model.type or model.entrypoint, not both")
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.entrypoint):
            raise ValueError(
                f"entrypoint {self.entrypoint!r} must look like 'package.module:function'"
            )
        self._no_gpt_fields("an entrypoint")
        return self

    def _no_gpt_fields(self, what: str) -> None:
        """The GPT's size fields, set to other than their defaults, would be ignored by another kind of model
        (defaults may be present: a resolved spec carries them)."""
        gpt_fields = {
            name for name in self.model_fields_set - {"entrypoint", "args", "type", "hf", "lora", "compile",
                                                      "activation_checkpointing"}
            if getattr(self, name) != type(self).model_fields[name].default
        }
        if gpt_fields:
            where = "model.hf.config_overrides" if self.hf is not None else "model.args"
            raise ValueError(f"{', '.join(sorted(gpt_fields))} apply to type: gpt only; {what} takes its "
                             f"settings in {where}")


class DataSpec(_Section):
    paths: list[str] = Field(
        ..., min_length=1,
        description="Parquet files or directories: local paths, abfs:// (Azure) or s3:// URIs.",
    )
    format: Literal["tokens", "table"] = Field(
        "tokens",
        description="tokens: a column of token sequences, batches {inputs, targets} shifted by one; "
        "table: numeric columns, batches {column: tensor} passed to the model as keyword arguments.",
    )
    column: str = Field(
        "tokens", description="tokens: the column of token sequences (list or fixed-size list of ints)."
    )
    seq_len: int | None = Field(
        None, ge=1,
        description="tokens: tokens per training sequence; rows are cut to seq_len + 1 "
        "(shorter rows are padded and their padding is left out of the loss). null: the files' own, from the "
        "shardrun.seq_len metadata `shardrun data prepare-text` writes (else a fixed-size list column's length "
        "less one); every file must agree, and the driver fills it in before the workers start.",
    )
    columns: list[str] | None = Field(
        None, description="table: feature columns (default: every column but the label)."
    )
    label: str | None = Field(None, description="table: the label column (passed as `label`).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the sample order.")
    partitions: int | None = Field(
        None, ge=1,
        description="Logical partitions of the sample order, fixed for the whole run; a multiple of "
        "every world size the run may use and a divisor of the global batch "
        "(default: scaling.num_workers; with num_workers [min, max], the least common multiple of "
        "min..max).",
    )
    shuffle_window: int = Field(
        8192, ge=1,
        description="Samples shuffled together inside a partition (memory per partition grows with it).",
    )
    prefetch_steps: int = Field(
        4, ge=1,
        description="Steps of batches each rank prepares ahead in the background (at least one chunk "
        "of about 512k tokens or 1024 table rows).",
    )
    read_threads: int = Field(
        2, ge=1, description="Threads per rank decoding row groups ahead of the loop."
    )
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail",
        description="A missing, corrupt or mismatching file or row group: fail with its name, or "
        "skip it, count it and say so.",
    )
    prepare: PrepareSpec | None = Field(
        None, description="Build the shards at data.paths[0] from a built-in corpus if missing."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataSpec:
        if self.prepare and is_uri(self.paths[0]):
            raise ValueError(
                f"data.prepare writes to a local path, and data.paths[0] is {self.paths[0]!r}; "
                "prepare locally, copy the shards there, and drop data.prepare"
            )
        if self.format == "tokens":
            if self.prepare and self.seq_len is None:
                raise ValueError("data.prepare needs data.seq_len: it writes rows of seq_len + 1 tokens")
            if self.columns or self.label:
                raise ValueError("data.columns and data.label are for format: table")
        elif self.prepare:
            raise ValueError("data.prepare makes token shards; it needs format: tokens")
        return self

    @property
    def tokens_per_sample(self) -> int:
        """Tokens one sample trains on (0 for tables, and for tokens before data.seq_len is known)."""
        return (self.seq_len or 0) if self.format == "tokens" else 0


class OptimizerSpec(_Section):
    type: Literal["adamw", "adam"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (adamw).")
    implementation: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="torch: torch.optim's Adam/AdamW inside DeepSpeed (its fused kernel on GPU), which compiles "
        "nothing; deepspeed: DeepSpeed's FusedAdam (GPU) or CPU Adam, built with nvcc or a C++ compiler on first "
        "use unless the image has them prebuilt (DS_BUILD_FUSED_ADAM=1 when DeepSpeed is installed).",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class ScheduleSpec(_Section):
    warmup_steps: int = Field(100, ge=0, description="Linear warmup from 0 to optimizer.lr.")
    decay: Literal["cosine", "constant"] = Field(
        "cosine", description="After warmup: cosine decay to min_lr_ratio * lr, or constant."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of lr.")


class OffloadSpec(_Section):
    optimizer: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where the optimizer state (fp32 master weights, Adam's moments) and its step live: on "
        "the device, in host memory (ZeRO 1-3), or on local NVMe under nvme_path (ZeRO 3: ZeRO-Infinity).",
    )
    params: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where the weights live between their uses (ZeRO 3): on the device, in host memory, or "
        "on local NVMe under nvme_path; each layer's are fetched to the GPU as it runs.",
    )
    nvme_path: str | None = Field(
        None, description="A folder on a local NVMe disk of every node (NC A100 v4 and ND VMs have local NVMe "
        "disks, to be mounted by the image), for offload to nvme.",
    )
    pin_memory: bool = Field(
        True, description="Page-locked host buffers for the offloaded state (faster copies to and from the GPU; "
        "they cannot be swapped out). GPU runs only.",
    )

    @property
    def on(self) -> bool:
        return self.optimizer != "none" or self.params != "none"


class DeepSpeedSpec(_Section):
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per micro step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro steps per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0: off).")
    reduce_dtype: Literal["auto", "fp32", "model"] = Field(
        "auto",
        description="The dtype the ranks reduce gradients in: fp32, or the model's (bf16, fp16: half the bytes on "
        "the wire, a coarser sum). auto: fp32 when the model is bf16 or fp16 and grad_accum_steps > 1 (each "
        "micro-batch's rounding adds up), the model's otherwise.",
    )
    overlap_comm: bool | None = Field(
        None,
        description="Reduce gradients while backward goes on (ZeRO 1-3), in buckets of a quarter of the model's "
        "parameters (10 to 500 million elements). null: on with GPUs, off on CPU (no streams to overlap on).",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    offload: OffloadSpec = Field(
        default_factory=OffloadSpec, description="ZeRO-Offload and ZeRO-Infinity: optimizer state and weights in "
        "host memory or on NVMe instead of GPU memory, for a model whose training state does not fit the GPUs "
        "(each step then moves them over PCIe: slower).",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged last over what shardrun builds "
        "(an existing ds_config.json keeps working); the batch keys are shardrun's (micro_batch_size, "
        "grad_accum_steps).",
    )

    @model_validator(mode="after")
    def _offload_fits_the_stage(self) -> DeepSpeedSpec:
        off = self.offload
        if off.optimizer != "none" and self.zero_stage == 0:
            raise ValueError("deepspeed.offload.optimizer needs ZeRO 1, 2 or 3 (deepspeed.zero_stage is 0): ZeRO's "
                             "optimizer is what offloads")
        if off.params != "none" and self.zero_stage != 3:
            raise ValueError(f"deepspeed.offload.params needs ZeRO 3 (deepspeed.zero_stage is {self.zero_stage}): "
                             "only stage 3 partitions the weights; offload.optimizer works at 1 and 2")
        if off.optimizer == "nvme" and self.zero_stage != 3:
            raise ValueError("deepspeed.offload.optimizer: nvme needs ZeRO 3 (ZeRO-Infinity); at ZeRO 1 and 2 "
                             "offload it to cpu")
        if "nvme" in (off.optimizer, off.params) and not off.nvme_path:
            raise ValueError("deepspeed.offload to nvme needs deepspeed.offload.nvme_path (a folder on a local NVMe "
                             "disk of every node)")
        if off.optimizer == "nvme" and self.optimizer.implementation != "deepspeed":
            raise ValueError("deepspeed.offload.optimizer: nvme swaps the optimizer state through DeepSpeed's CPU "
                             "Adam: set deepspeed.optimizer.implementation: deepspeed (it is built with a C++ "
                             "compiler on first use)")
        return self

    @field_validator("config")
    @classmethod
    def _no_batch_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = [key for key in COMPUTED_BATCH_KEYS if key in value]
        if taken:
            raise ValueError(f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} computed by shardrun for "
                             "every world size: set deepspeed.micro_batch_size and deepspeed.grad_accum_steps "
                             "instead")
        return value


class ScalingSpec(_Section):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Training processes (ranks); [min, max] makes the run elastic: Ray starts as many "
        "as the cluster has room for, and a group that loses workers goes on with fewer, down to min, "
        "and grows back to max when room returns (each change resumes from the latest checkpoint).",
    )
    keep_global_batch: bool = Field(
        True,
        description="Elastic runs: keep the global batch of max workers while fewer run (gradient "
        "accumulation grows); false keeps grad_accum_steps, so the global batch follows the world size.",
    )
    resize_check_seconds: float = Field(
        60.0, gt=0, description="Elastic runs: how often a healthy group checks whether it can grow."
    )
    use_gpu: bool = Field(False, description="One or more GPUs per worker; NCCL between them.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(
        1.0, ge=0,
        description="GPUs reserved per worker (use_gpu): a whole number; each rank trains on the first of its own.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the workers."
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | tuple[int, int]:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if whole(value):
            return value
        if isinstance(value, list | tuple) and len(value) == 2 and all(whole(v) for v in value):
            if value[0] > value[1]:
                raise ValueError("[min, max] needs min <= max")
            return value[0] if value[0] == value[1] else (value[0], value[1])
        raise ValueError("must be a whole number >= 1, or [min, max] of them for an elastic run")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple) and self.num_workers[0] != self.num_workers[1]

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def world_sizes(self) -> list[int]:
        """Every world size the run may train with."""
        if isinstance(self.num_workers, tuple):
            return list(range(self.num_workers[0], self.num_workers[1] + 1))
        return [self.num_workers]


class CheckpointSpec(_Section):
    storage: str = Field(
        "~/shardrun/runs", description="Where runs live (path or URI); run dir = storage/name."
    )
    every_steps: int = Field(100, ge=1, description="Save every this many steps (and at the end).")
    keep: int = Field(2, ge=1, description="Newest checkpoints to keep (with keep_best: those of the lowest "
                      "held-out loss, and the newest besides).")
    keep_best: bool = Field(
        False, description="Keep the keep checkpoints with the lowest held-out loss (eval section), and the newest "
        "for resuming, instead of the keep newest; a checkpoint saved at a step without an evaluation ranks last. "
        "Ray Train's own retention (checkpoint_score_attribute eval_loss) does the same.",
    )


class MetricsSpec(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics from every rank and the driver.")
    host: str = Field(
        "auto",
        description="Address the metrics endpoints listen on. auto: 127.0.0.1 for a run on this machine alone "
        "(a local Ray instance, or `shardrun train` on one node), so a laptop opens no port to its network; "
        "0.0.0.0 on a cluster (RAY_ADDRESS set, or torchrun across nodes), advertised as the node's IP. Keep the "
        "port range closed to all but the cluster's network (deploy/azure does).",
    )
    port: int = Field(
        0, ge=0, le=65535,
        description="Port of rank 0 on each node (0: any free port, so jobs and workers never collide); "
        "a fixed port p gives local rank i the port p + i.",
    )
    targets_dir: str = Field(
        "/tmp/ray/shardrun/targets",
        description="Prometheus file_sd folder on the driver's node: <run>.json lists the run's "
        "endpoints while it runs (deploy/monitoring/prometheus.yml reads it, beside Ray's own file).",
    )
    peak_flops: float | None = Field(
        None, gt=0,
        description="Peak FLOP/s of one device for MFU (default: from the GPU's name; none on CPU).",
    )
    jsonl: bool = Field(True, description="Append every progress record to <run dir>/metrics.jsonl.")


class TensorBoardSpec(_Section):
    dir: str | None = Field(
        None, description="The folder TensorBoard's event files go to (`tensorboard --logdir` it); null: "
        "<run dir>/tensorboard. A local folder (on a cluster, one on the driver's node, the head) or a URI "
        "(abfs://, s3://): the event files are written on the driver's disk and uploaded whole every minute, at each "
        "restart and at the end.",
    )


class MlflowSpec(_Section):
    tracking_uri: str | None = Field(
        None, description="The MLflow tracking server (http://host:5000, an Azure ML workspace's azureml://... "
        "URI, databricks); null: MLFLOW_TRACKING_URI from the environment, which Azure ML compute sets.",
    )
    experiment: str | None = Field(None, description="The MLflow experiment (null: the run's name).")
    run_name: str | None = Field(None, description="The MLflow run's name (null: the run's name).")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of your own on the MLflow run.")


class WandbSpec(_Section):
    project: str = Field(description="The W&B project the run goes to.")
    entity: str | None = Field(None, description="The W&B team or user (default: the API key's own).")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: sent to W&B as the run goes (WANDB_API_KEY or `wandb login` on the "
        "driver's machine); offline: written to the run dir only (`wandb sync` uploads it later).",
    )


class TrackingSpec(_Section):
    mlflow: MlflowSpec | None = Field(
        None, description="Log the run to MLflow (the `mlflow` extra): metrics.jsonl's records at their step, the "
        "resolved spec as parameters, summary.json as an artifact; one MLflow run across restarts. On by itself "
        "when MLFLOW_TRACKING_URI is set (Azure ML compute sets it); `mlflow: {tracking_uri: none}` keeps it off.",
    )
    tensorboard: TensorBoardSpec | None = Field(
        None, description="Log every metrics.jsonl record to TensorBoard event files (the `tensorboard` extra), "
        "with the step as TensorBoard's step, restarts and resumes as text, the resolved spec as text.",
    )
    wandb: WandbSpec | None = Field(
        None, description="Log the run to Weights & Biases (the `wandb` extra): metrics.jsonl's records at their "
        "step, the resolved spec as its config, summary.json as a file; one W&B run across restarts.",
    )


class FailureSpec(_Section):
    max_failures: int = Field(
        0, ge=-1, description="Worker group restarts from the latest checkpoint (-1: no limit)."
    )
    same_failure_limit: int = Field(
        3, ge=0,
        description="A worker error that comes back at the same step (same rank, same message) in this many "
        "attempts of the worker group ends the run, whatever max_failures says: a restart would meet it again "
        "(0: no limit).",
    )
    max_preemptions: int = Field(
        -1, ge=-1,
        description="Restarts after a node was taken away (a drained, preempted node), counted apart from "
        "max_failures (-1: no limit).",
    )
    nonfinite_loss: Literal["skip", "stop"] = Field(
        "skip",
        description="A step whose loss is NaN or infinite on any rank: skip leaves it out (DeepSpeed does "
        "not apply its update), counts and logs it; stop ends the run with an error. ZeRO stage 0 in fp32 "
        "does not check gradients, so there the run stops either way.",
    )
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Consecutive skipped non-finite steps after which the run stops with an error."
    )
    data_wait_timeout_s: float = Field(
        600.0, gt=0,
        description="A row group whose read gives nothing for this long (a stalled mount or object store) ends "
        "the worker group, naming the file and row group, instead of a silent wait that no collective timeout "
        "ends when every rank waits on the same storage.",
    )
    checkpoint_timeout_s: float = Field(
        900.0, gt=0, lt=LONG_TIMEOUT_S,
        description="A checkpoint's upload to checkpoint.storage, or its conversion for another world size, "
        "that takes longer ends the worker group with the checkpoint named (retried under max_failures), "
        f"before the other ranks' {LONG_TIMEOUT_S / 60:.0f}-minute wait at the save's barrier ends it "
        "without a word.",
    )
    collective_timeout_s: float = Field(
        300.0, gt=0,
        description="Once training runs, a collective that waits longer than this fails the group (a dead "
        "or hung peer) instead of hanging for the backend's 30 minutes; checkpoint saves get the long one.",
    )
    scheduled_events: str = Field(
        "auto",
        description="Azure Scheduled Events: on a Preempt or Terminate event for its VM, every rank "
        "checkpoints at the next step, the event is acknowledged, the VM's Ray node is drained, and the "
        "group resumes on the nodes left once it is gone. auto: watch http://169.254.169.254 on Azure VMs "
        "(known by their DMI asset tag), nothing elsewhere; off; or the metadata service's URL.",
    )

    @field_validator("scheduled_events", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML reads a bare off/no/false as False (and on/yes/true as True)
        if isinstance(value, bool):
            return "auto" if value else "off"
        if isinstance(value, str) and value not in ("auto", "off") and not value.startswith(("http://", "https://")):
            raise ValueError("auto, off, or the metadata service's http:// URL")
        return value


class EvalSpec(_Section):
    paths: list[str] = Field(
        ..., min_length=1,
        description="Held-out Parquet files or directories in the training data's format (data.format, "
        "data.column, data.seq_len, data.label), local or abfs:// / s3://.",
    )
    every_steps: int | None = Field(
        None, ge=1, description="Evaluate every this many steps (null: only at the end, with at_end).",
    )
    max_batches: int = Field(
        50, ge=1, description="Micro-batches of deepspeed.micro_batch_size rows evaluated, over all ranks: the "
        "held-out set's first max_batches x micro_batch_size rows, in file order, the same for every world size.",
    )
    at_end: bool = Field(True, description="Evaluate after the last step too.")
    at_start: bool = Field(False, description="Evaluate before the first step of a new run too (step 0: the "
                           "loaded model's held-out loss, the baseline a fine-tune starts from).")


class RunSpec(_Section):
    max_steps: int = Field(..., ge=1, description="Optimizer steps to train to.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of weights and dropout.")
    log_every: int = Field(10, ge=1, description="Progress line every this many steps.")


class JobSpec(_Section):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=NAME_LIMIT,
        description="Run name; same name again resumes the run.",
    )
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers the driver logs the run to, off the training "
        "path: one tracked run however often it restarts (docs/tracking.md).",
    )
    eval: EvalSpec | None = Field(
        None, description="A validation loop on held-out data: the token-weighted mean loss over every rank's "
        "share, in metrics.jsonl (eval_loss), Prometheus (shardrun_eval_loss) and summary.json; training's "
        "data position, random state and mode are left as they were.",
    )
    run: RunSpec

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.model.type == "gpt" and self.data.format != "tokens":
            raise ValueError("the built-in gpt model trains on data.format: tokens")
        if self.model.type == "gpt" and self.data.seq_len is not None and self.data.seq_len > self.model.block_size:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is longer than "
                f"model.block_size ({self.model.block_size})"
            )
        hf = self.model.hf
        if hf is not None and hf.classifies != (self.data.format == "table"):
            raise ValueError("model.hf.task sequence_classification trains on data.format: table (an input_ids "
                             "column and data.label)" if hf.classifies else
                             f"model.hf.task {hf.task} trains on data.format: tokens; a table of labelled rows "
                             "trains model.hf.task: sequence_classification")
        if hf is not None and hf.attn_implementation == "flash_attention_2" and not (
                self.scaling.use_gpu and self.deepspeed.precision in ("bf16", "fp16")):
            raise ValueError("model.hf.attn_implementation flash_attention_2 runs on GPUs in bf16 or fp16: set "
                             "scaling.use_gpu: true and deepspeed.precision: bf16, or use sdpa")
        if hf is not None and hf.classifies and not self.data.label:
            raise ValueError("model.hf.task sequence_classification needs data.label (the table's label column)")
        if self.checkpoint.keep_best and (self.eval is None or not self.eval.every_steps):
            raise ValueError("checkpoint.keep_best ranks checkpoints by their held-out loss: it needs an eval "
                             "section with every_steps")
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if self.scaling.use_gpu and self.scaling.gpus_per_worker == 0:
            raise ValueError("scaling.use_gpu needs scaling.gpus_per_worker above 0")
        if self.scaling.use_gpu and self.scaling.gpus_per_worker != int(self.scaling.gpus_per_worker):
            raise ValueError(f"scaling.gpus_per_worker is {self.scaling.gpus_per_worker:g}: NCCL takes a whole GPU "
                             "per rank (two ranks on one GPU fail with 'duplicate GPU'); use 1, or fewer workers")
        if self.metrics.port and self.metrics.port + self.scaling.max_workers - 1 > 65535:
            raise ValueError(f"metrics.port {self.metrics.port} + local rank goes past 65535 with up to "
                             f"{self.scaling.max_workers} workers on a node; choose a lower port, or 0 (any free)")
        for world in self.scaling.world_sizes:
            check_partitions(self.partitions, world, self.global_batch_for(world), error=ValueError)
        return self

    @property
    def partitions(self) -> int:
        """data.partitions, or the default: the least common multiple of every world size the run may use."""
        return self.data.partitions or default_partitions(self.scaling)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all ranks (at max workers)."""
        d = self.deepspeed
        return d.micro_batch_size * d.grad_accum_steps * self.scaling.max_workers

    def grad_accum_for(self, world_size: int) -> int:
        """Micro steps per optimizer step with world_size ranks (elastic runs keep the global batch)."""
        d = self.deepspeed
        if not self.scaling.keep_global_batch or world_size == self.scaling.max_workers:
            return d.grad_accum_steps
        per_step = d.micro_batch_size * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"with {world_size} workers the global batch of {self.global_batch} (micro_batch_size x "
                f"grad_accum_steps x {self.scaling.max_workers} max workers) is not a whole number of "
                f"micro-batches of {d.micro_batch_size} per worker; choose num_workers [min, max] whose "
                "sizes divide it, or set scaling.keep_global_batch: false"
            )
        return self.global_batch // per_step

    def global_batch_for(self, world_size: int) -> int:
        d = self.deepspeed
        return d.micro_batch_size * self.grad_accum_for(world_size) * world_size

    def eval_data(self) -> DataSpec | None:
        """The held-out data of the eval section, read as the training data is (format, column, seq_len,
        label)."""
        if self.eval is None:
            return None
        return self.data.model_copy(update={"paths": list(self.eval.paths), "prepare": None})

    @property
    def run_dir(self) -> str:
        """Where this run's checkpoints, spec and summary live."""
        return join(self.checkpoint.storage, self.name)

    def to_yaml(self) -> str:
        """The resolved spec, every default filled in."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def warnings(self) -> list[str]:
        """Settings that are valid but most likely not meant (`check` and `run` print them, and go on)."""
        found = []
        warmup, steps = self.deepspeed.schedule.warmup_steps, self.run.max_steps
        if warmup * WARMUP_SHARE > steps:
            what = ("the whole run is warm-up: the learning rate never reaches deepspeed.optimizer.lr"
                    if warmup >= steps else f"{warmup} of the run's {steps} steps are warm-up")
            found.append(f"deepspeed.schedule.warmup_steps ({warmup}) is more than a fifth of run.max_steps "
                         f"({steps}), so {what}; set deepspeed.schedule.warmup_steps to {steps // WARMUP_SHARE} "
                         f"or less (e.g. --set deepspeed.schedule.warmup_steps={steps // 10})")
        if self.checkpoint.keep_best and self.eval is not None and self.eval.every_steps and \
                self.checkpoint.every_steps % self.eval.every_steps:
            found.append(f"checkpoint.keep_best ranks checkpoints by the held-out loss of their step, but "
                         f"checkpoint.every_steps ({self.checkpoint.every_steps}) is no multiple of eval.every_steps "
                         f"({self.eval.every_steps}): checkpoints between evaluations rank last")
        return found


def default_partitions(scaling: ScalingSpec | None = None) -> int:
    """data.partitions when unset: the least common multiple of every world size the run may use (of the default
    scaling.num_workers without a spec, as `shardrun data inspect` counts)."""
    return math.lcm(*(scaling or ScalingSpec()).world_sizes)


def check_partitions(partitions: int, world_size: int, global_batch: int,
                     error: type[Exception] = UserError) -> None:
    """Every rank owns as many partitions, and every partition gives as many samples to a step."""
    if partitions % world_size:
        raise error(
            f"data.partitions ({partitions}) must be a multiple of the world size ({world_size}), "
            f"so that every rank owns as many partitions; set data.partitions to a multiple of "
            f"every world size the run may use"
        )
    if global_batch % partitions:
        raise error(
            f"the global batch ({global_batch} = micro_batch_size x grad_accum_steps x workers) must "
            f"be a multiple of data.partitions ({partitions}), so that every partition gives a step "
            "as many samples"
        )


def load(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a job spec file, apply `key.path=value` overrides, validate, resolve local paths.

    Errors name the file (with line and column for YAML syntax), or the `--set KEY=VALUE` a problem came from.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read the job spec ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(yaml_error(str(path), e)) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a job spec is a mapping of sections, got {type(raw).__name__}")
    sets = {}
    for item in overrides:
        sets[apply_override(raw, item)] = item
    return parse(raw, source=str(path), overrides=sets)


def yaml_error(source: str, error: yaml.YAMLError) -> str:
    """`source:LINE:COLUMN: not valid YAML: problem (context)` in one line (PyYAML's own names no file)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or not problem:
        return f"{source}: not valid YAML: {' '.join(str(error).replace('<unicode string>', source).split())}"
    text = f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
    context, where = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and where is not None and (where.line, where.column) != (mark.line, mark.column):
        text += f" ({context} that starts at line {where.line + 1}, column {where.column + 1})"
    elif context:
        text += f" ({context})"
    return text


def parse(raw: dict, source: str = "job spec", overrides: dict[tuple[str, ...], str] | None = None) -> JobSpec:
    """Validate a plain dict; errors name the field path and the value. `overrides` maps the key path of each
    `--set` to the `KEY=VALUE` given: problems under that key are blamed on it instead of on `source`."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_errors(e, source, overrides)) from None
    return _resolve_paths(spec)


def revalidate(spec: JobSpec, source: str) -> None:
    """Run every check again on a spec the driver completed (data.seq_len taken from the data): the checks that
    needed the value run now, with the errors they give at load time."""
    try:
        JobSpec.model_validate(spec.model_dump())
    except ValidationError as e:
        raise UserError(format_errors(e, source)) from None


def apply_override(raw: dict, item: str) -> tuple[str, ...]:
    """Set `a.b.c=value` in a nested dict; the value is read as YAML (numbers, lists, bools). Returns the key
    path."""
    key, sep, value = item.partition("=")
    parts = tuple(key.split("."))
    if not sep or not all(parts):
        raise UserError(f"--set {item}: expected key.path=value, e.g. --set run.max_steps=100")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or an empty section (`run:`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        if value.lstrip().startswith(("[", "{", '"', "'")):  # meant as YAML: a list, a mapping, a quoted string
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"--set {item}: the value is not valid YAML: {problem}") from None
        node[parts[-1]] = value  # a plain string that YAML would misread (`a: b`)
    return parts


def format_errors(error: ValidationError, source: str,
                  overrides: dict[tuple[str, ...], str] | None = None) -> str:
    """One line per problem: `source: field.path: what is wrong (got value)`, unknown keys (with their
    'did you mean') first. A problem under a `--set` key names `--set KEY=VALUE` as its source."""
    lines = []
    for err in sorted(error.errors(), key=lambda err: err["type"] != "extra_forbidden"):
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            what = "unknown key" + _did_you_mean(err["loc"])
        else:
            what = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        if isinstance(err["input"], dict) and err["type"] != "extra_forbidden":
            got = ""
        lines.append(f"{_blame(err, source, overrides)}: {where + ': ' if where else ''}{what}{got}")
    return "\n".join(lines)


def _blame(err: dict, source: str, overrides: dict[tuple[str, ...], str] | None) -> str:
    """`--set KEY=VALUE` for a problem at or under that key (or an unknown key the --set made), else source."""
    loc = tuple(str(p) for p in err["loc"])
    matches = [key for key in overrides or {}
               if loc and (loc[:len(key)] == key or (err["type"] == "extra_forbidden" and key[:len(loc)] == loc))]
    return f"--set {overrides[max(matches, key=len)]}" if matches else source


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if a]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _resolve_paths(spec: JobSpec) -> JobSpec:
    """Local paths become absolute here, so workers (other cwd, other node) see the same ones."""

    def resolve(p: str) -> str:
        return p if is_uri(p) else os.path.abspath(os.path.expanduser(p))

    spec.data.paths = [resolve(p) for p in spec.data.paths]
    if spec.eval is not None:
        spec.eval.paths = [resolve(p) for p in spec.eval.paths]
    spec.checkpoint.storage = resolve(spec.checkpoint.storage)
    return spec
