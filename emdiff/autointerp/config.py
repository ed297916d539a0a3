"""Settings of an auto-interpretation run, and its one error type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from emdiff.eval.chat_client import ENV_NAME

PROMPT_VERSION = 1
"""Bump when a prompt changes, so cached explanations made with the old one are asked again."""


class AutoInterpError(RuntimeError):
    """The explainer or scorer server failed for good; latents finished so far are cached."""


class ReplyError(Exception):
    """The model answered, but not in the asked-for form (or the server refused the request).

    ``retry`` is False where asking again cannot help (the server refused this prompt).
    """

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class AutoInterpConfig(BaseModel):
    """Where the explainer/scorer model is and how latents are explained and scored."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a key pasted by mistake stays hidden

    url: str = "https://api.openai.com/v1"
    """Server root including ``/v1`` (``http://localhost:8000/v1`` for vLLM)."""
    model: str = "gpt-4o-mini"
    """Model that writes explanations and, shown one, predicts where the latent fires."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """NAME of the environment variable holding the API key; the key is never stored."""
    n_explain: int = Field(10, ge=1)
    """Most activating contexts shown to the explainer (half of a card's contexts at most)."""
    n_holdout: int = Field(10, ge=1)
    """Most held-out activating contexts, and as many non-activating ones, for detection."""
    seed: int = 0
    """Seeds the explain/held-out split and the shuffling of detection examples."""
    timeout: float = Field(60.0, gt=0)
    """Seconds per HTTP attempt."""
    max_retries: int = Field(6, ge=0)
    """Retries of a request after 429, 5xx, timeouts and malformed reply bodies."""
    backoff: float = Field(1.0, ge=0)
    """First retry delay in seconds; doubles each retry."""
    parse_retries: int = Field(2, ge=0)
    """Extra asks when the model's text cannot be parsed; then the failure is recorded."""
    batch_size: int = Field(5, ge=1)
    """Detection examples per scorer prompt (delphi's default is 5)."""
    threshold: float = Field(0.3, ge=0, lt=1)
    """Tokens above this fraction of a context's maximum activation are marked ``<<like this>>``."""
    logprobs: bool = False
    """Ask for token log-probabilities of the detection answers, to report an AUC."""
    concurrency: int = Field(4, ge=1)
    """Latents worked on at once."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the explainer (detection always uses 0)."""
    max_tokens: int = Field(400, ge=16)
    """Longest explainer reply (room for a few lines of reasoning before the explanation)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {v!r}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v and not ENV_NAME.fullmatch(v):  # never echo the value: it may be the key itself
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                "not the key itself"
            )
        return v or None

    def scoring_identity(self) -> dict:
        """The settings a cached result depends on (not the URL, timeouts or concurrency)."""
        keys = ("n_explain", "n_holdout", "seed", "batch_size", "threshold", "logprobs")
        return {
            "prompt": PROMPT_VERSION,
            "temperature": self.temperature,
            **{k: getattr(self, k) for k in keys},
        }
