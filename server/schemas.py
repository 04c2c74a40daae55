"""Request bodies: OpenAI's speech request plus SpecTTS's decoding extensions, and the WebSocket's
session.config. Static constraints live here; what depends on the served models (model and voice names,
the input length limit: `server.speech.ServerState`; the decoding modes the bundle supports: the
engine, when the request opens) is checked after parsing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.types import ACCEPTS, DECODINGS

FORMATS = ("wav", "pcm", "flac", "mp3", "opus")
STREAM_FORMATS = ("wav", "pcm")  # one container for the whole stream; the others need whole files
AudioFormat = Literal[FORMATS]

# OpenAI's voice names, all accepted as aliases of the bundle's one voice (clients written for OpenAI
# work unchanged; they all sound the same).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse", "marin", "cedar")


class SpeechOptions(BaseModel):
    """What shapes the audio, shared by HTTP requests and WebSocket sessions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, max_length=256, description="a served model (GET /v1/models: "
                              "tts-1, and tts-1-hd where served); spectts or no model: the "
                              "default model")
    voice: str | None = Field(None, max_length=256, description="a speaker of the voice (GET "
                              "/v1/audio/voices) or an OpenAI voice name (an alias of the "
                              "default speaker)")
    speed: float = Field(1.0, ge=0.25, le=4.0, description="speaking rate; 2.0 is twice as fast")
    decoding: Literal[DECODINGS] | None = Field(None, description="default: the server's")
    accept: Literal[ACCEPTS] | None = Field(None, description="default: the server's")
    tau: int | None = Field(None, ge=1, le=64, description="heads + tolerance: top-tau / tau samples")
    beta: float | None = Field(None, ge=0, le=10, description="draft + tolerance: SSD's beta")
    min_ratio: float | None = Field(None, ge=0, le=1, description="greedy tolerance: a top-tau token "
                                    "needs this share of the top token's probability")
    gamma: int | None = Field(None, ge=1, le=16, description="draft: tokens drafted per round")
    temperature: float | None = Field(None, ge=0, le=10, description="0: greedy")
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0: off")
    top_p: float | None = Field(None, gt=0, le=1, description="1: off")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="> 1 discourages "
                                             "recent tokens; default: the voice's (1: off)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed")


class SpeechRequest(SpeechOptions):
    """POST /v1/audio/speech. Unknown fields are refused (as OpenAI does), so typos do not pass
    silently. The default format is wav (OpenAI's is mp3)."""

    input: str = Field(..., description="the text to speak")
    response_format: AudioFormat = "wav"
    instructions: str | None = Field(None, max_length=4096,
                                     description="accepted for OpenAI compatibility; ignored")
    stream: bool = Field(False, description="send audio with chunked transfer while it is "
                                            "generated (wav or pcm)")
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="sse: server-sent events speech.audio.delta / speech.audio.done "
                             "(implies streaming)")


class SessionConfig(SpeechOptions):
    """The WebSocket's {"type": "session.config", ...}. Fields other clients of the same protocol send
    (vLLM-Omni's language, stream_audio, ...) are ignored; audio frames are always PCM16."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    type: Literal["session.config"]
    response_format: Literal["pcm"] = Field("pcm", description="binary frames: PCM16 LE mono")


class InputText(BaseModel):
    """{"type": "input.text", "text": "..."}: the next piece of text (any size, word by word)."""

    type: Literal["input.text"]
    text: str
