"""Server settings: environment variables `SPECTTS_*`, overridden by `spectts serve` flags.

This is the only module that uses pydantic-settings. Everything the server can be told lives here, with
its default; `Settings()` reads the environment, `Settings(**flags)` lets explicit values win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.decoding.sampling import SamplingParams
from engine.serving.capacity import CAPACITY_MARGIN
from engine.types import ACCEPTS, DECODINGS, GenerationConfig, default_of, help_of
from models.runners import RUNNERS
from models.voices.bundle import DEFAULT_VOICE, PHONEME_DURATIONS
from server.model_registry import MODELS_HELP, ModelRegistry

Device = Literal["cpu", "cuda", "auto"]


def _engine_field(cls: type, name: str, **constraints):
    """A setting whose default and description are the engine's (`GenerationConfig` /
    `SamplingParams`), so they cannot drift apart."""
    return Field(default_of(cls, name), description=help_of(cls, name), **constraints)


Decoding = Literal[("auto", *DECODINGS)]
Accept = Literal[ACCEPTS]


class Settings(BaseSettings):
    """Everything `create_app` needs. Field names are the env names without the prefix."""

    model_config = SettingsConfigDict(env_prefix="SPECTTS_", extra="forbid")

    # --- network ------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address (the container uses 0.0.0.0)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")

    # --- model --------------------------------------------------------------------------------
    bundle: Path = Field(DEFAULT_VOICE, description="voice bundle directory, or a Hugging Face "
                         "checkpoint of a voice family (with codec)")
    codec: Path | None = Field(None, description="the checkpoint's codec directory (SNAC 24 kHz "
                               "for Orpheus-family checkpoints); unset: bundle is a voice bundle")
    draft: Path | None = Field(None, description="a smaller Llama with the checkpoint's vocabulary, "
                               "for decoding 'draft' (checkpoints served with codec)")
    heads: Path | None = Field(None, description="draft heads trained for the checkpoint "
                               "(`spectts train-heads --out DIR`), for decoding 'heads' "
                               "(checkpoints served with codec)")
    models: str | None = Field(None, description=MODELS_HELP)
    device: Device = Field("auto", description="where the model runs (auto: CUDA when available)")
    threads: int | None = Field(None, ge=1, description="torch threads; default 1 on CPU")
    max_len: int = Field(4096, ge=64, description="KV cache length per sequence, in tokens")
    runner: Literal[("auto", *RUNNERS)] = Field("auto", description="how the networks' forwards "
                                                "run: torch, or compiled CPU kernels (float32 "
                                                "on the CPU); auto: compiled where it can")

    # --- default decoding (a request may override each): defaults and help from the engine's -----
    decoding: Decoding = Field("auto", description="auto: the fastest decoding on this machine "
                                                   "(and heads tree), measured at start; or "
                                                   + help_of(GenerationConfig, "decoding"))
    accept: Accept = _engine_field(GenerationConfig, "accept")
    tau: int = _engine_field(GenerationConfig, "tau", ge=1)
    beta: float = _engine_field(GenerationConfig, "beta", ge=0)
    min_ratio: float = _engine_field(GenerationConfig, "min_ratio", ge=0, le=1)
    gamma: int = _engine_field(GenerationConfig, "gamma", ge=1, le=16)
    temperature: float | None = Field(None, ge=0, description=help_of(SamplingParams, "temperature")
                                      + "; unset: the voice's (greedy for bundles, 0.6 with top_p "
                                      "0.8 and repetition penalty 1.3 for Orpheus)")

    # --- limits -------------------------------------------------------------------------------
    max_input_chars: int = Field(4096, ge=1, description="longest input text, in characters: an "
                                 "HTTP input, a WebSocket message, and a WebSocket session's text "
                                 "received and not yet spoken (its total has no limit)")
    max_batch: int = Field(16, ge=1, description="requests decoded together (the engine's batch, "
                                                "continuous: requests join and leave between "
                                                "steps); more wait in the queue; 1: one at a time")
    queue_size: int = Field(64, ge=1, description="requests waiting for a stream (FIFO); "
                            "beyond: 503 at once")
    max_queue_wait_s: float = Field(2.0, gt=0, description="a request waits this long at most in "
                                    "the queue for a stream, then gets 503 with Retry-After")
    admission_control: bool = Field(True, description="queue new requests beyond the streams "
                                    "this machine keeps ahead of real time, or while one is "
                                    "behind; false: only free batch slots count")
    prefill_chunk: int = Field(64, ge=0, description="prompt tokens a newcomer prefills per step, "
                                                     "so running streams are not stalled; 0: all")
    row_budget: int = Field(64, ge=0, description="speculative candidate rows per step across "
                                                  "the batch (trees shrink under load); 0: no cap")
    first_chunk_frames: int = Field(4, ge=1, description="speech frames (20 ms each; a voice with "
                                    "longer frames rounds up to its own) in a sentence's first "
                                    "audio chunk: time to first audio against the buffer a player "
                                    "starts with; later chunks grow by half up to chunk_frames")
    chunk_frames: int = Field(40, ge=1, description="largest audio chunk, in speech frames "
                                                    "(20 ms each)")
    capacity_margin: float = Field(CAPACITY_MARGIN, ge=1.0, description="admission control: admit streams "
                                   "while each would be generated this much faster than real time")
    switch_interval_s: float = Field(0.0005, gt=0, description="Python's thread switch interval "
                                     "(sys.setswitchinterval; Python's default 0.005): the engine "
                                     "thread releases the GIL in every torch op and must get it "
                                     "back quickly while the event loop is busy")
    vocoder_thread: bool = Field(True, description="vocode in a thread of its own (another core) "
                                 "while the engine decodes the next step; false: the engine "
                                 "thread vocodes each step's audio itself")
    prefix_cache_blocks: int = Field(256, ge=0, description="16-token prompt blocks kept for "
                                     "reuse by later requests with the same prefix; 0: off")
    phoneme_coverage: float | None = Field(None, gt=0, description="speech tokens allowed after "
                                           "each phoneme: those covering this share of its training "
                                           "frames (unset: the bundle's; 1: no constraint)")
    phoneme_durations: Literal[PHONEME_DURATIONS] | None = Field(
        None, description="who ends each phoneme: the speech LM ('model') or espeak-ng's timing "
                          "('frontend', forced); unset: the bundle's")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still generating after "
                                                              "this long is cancelled")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 503 (at capacity)")

    # --- scale-out on Ray Serve (server/scale_out.py; needs the `ray` extra) ----------------------
    replicas: int = Field(1, ge=1, description="Ray Serve replicas of this server, one engine each "
                                               "(1 without ray_address: no Ray, one process)")
    ray_address: str | None = Field(None, description="deploy to this Ray cluster (e.g. "
                                    "ray://head:10001 or auto); unset: start a local one")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica")
    replica_max_ongoing: int | None = Field(None, ge=1, description="Serve's max_ongoing_requests: "
                                            "requests (a WebSocket: its whole connection) one "
                                            "replica takes at once; unset: the streams a replica "
                                            "keeps ahead of real time, measured at start, + 1")
    replica_max_queued: int = Field(4, ge=1, description="Serve's max_queued_requests: requests "
                                    "waiting for a free replica; beyond: 503 + Retry-After")
    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling between min_replicas and "
                                     "this (starting at replicas); unset: a fixed count")
    target_ongoing: float | None = Field(None, gt=0, description="autoscaling: requests per "
                                         "replica Serve aims for; unset: half a replica's "
                                         "measured capacity")
    ray_metrics_port: int = Field(8080, ge=0, le=65535, description="local Ray cluster: port of "
                                  "Ray's Prometheus export (spectts_* of every replica, Serve's own)")

    # --- access -------------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="when set, every route but /health, "
                                      "/ready and the playground's static files needs "
                                      "'Authorization: Bearer KEY' (prefer the environment: flags "
                                      "show in the process list)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="server log level")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        """SPECTTS_API_KEY= (empty, as compose passes an unset variable) means no key."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @model_validator(mode="after")
    def _models_are_valid(self) -> Settings:
        """Bad pairs, repeated names, or codec/draft/heads given with models: refused here."""
        self.registry()
        return self

    def registry(self) -> ModelRegistry:
        """The served models by name (`server.model_registry`): `models`, else one `tts-1` from
        `bundle`."""
        return ModelRegistry.build(self.models, self.bundle, self.codec, self.draft, self.heads)

    def torch_threads(self, device: str) -> int | None:
        """The torch thread count to set, or None to leave torch alone (CUDA).

        On CPU the default is 1: the engine decodes a batch of small matrices per step, which gains
        little from intra-op threads, while oversubscribed OpenMP (torch's pool spinning on every core
        next to other processes — here a training job on a shared 2-core machine) makes every step
        wait on preempted threads and is disastrous for latency. Raise it on a dedicated machine."""
        if self.threads is not None:
            return self.threads
        return 1 if device == "cpu" else None
