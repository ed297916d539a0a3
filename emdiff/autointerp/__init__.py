"""Auto-interpretation of dictionary latents, as EleutherAI's delphi does it.

An explainer model reads a latent's top-activating contexts (active tokens marked ``<<like
this>>``) and non-activating counterexamples and writes a one-sentence explanation; a scorer model
shown that explanation sorts a shuffled mix of held-out activating and non-activating contexts,
and the explanation is scored by the balanced accuracy of that detection (with the AUC when the
server gives log-probabilities). Any OpenAI-compatible chat-completions server works; on the toy
world, :class:`~emdiff.autointerp.toy.ToyExplainer` gives a reference score from the world's
labels through the same held-out procedure.
"""

from emdiff.autointerp.cards import Card, Context, load_cards, split_card
from emdiff.autointerp.client import LLMInterpreter
from emdiff.autointerp.config import AutoInterpConfig, AutoInterpError, ReplyError
from emdiff.autointerp.detect import Detection, score_detection
from emdiff.autointerp.explain import Interpreter, explain_latent
from emdiff.autointerp.run import AutoInterpRun, LatentResult, interpret_cards, run_autointerp

__all__ = [
    "AutoInterpConfig",
    "AutoInterpError",
    "AutoInterpRun",
    "Card",
    "Context",
    "Detection",
    "Interpreter",
    "LLMInterpreter",
    "LatentResult",
    "ReplyError",
    "explain_latent",
    "interpret_cards",
    "load_cards",
    "run_autointerp",
    "score_detection",
    "split_card",
]
