"""Auto-interpretation of dictionary latents, as EleutherAI's delphi does it.

An explainer model reads a latent's top-activating contexts (active tokens marked ``<<like
this>>``) and non-activating counterexamples and writes a one-sentence explanation; a scorer model
shown that explanation sorts a shuffled mix of held-out activating and non-activating contexts,
and the explanation is scored by the balanced accuracy of that detection (with the AUC when the
server gives log-probabilities). Any OpenAI-compatible chat-completions server works; on the toy
world, :class:`~emdiff.autointerp.toy.ToyExplainer` gives a reference score from the world's
labels through the same held-out procedure.
"""

from emdiff.lazy import lazy_exports

_WHERE = {
    "Card": "cards",
    "Context": "cards",
    "load_cards": "cards",
    "split_card": "cards",
    "LLMInterpreter": "client",
    "AutoInterpConfig": "config",
    "AutoInterpError": "config",
    "ReplyError": "config",
    "Detection": "detect",
    "score_detection": "detect",
    "Interpreter": "explain",
    "explain_latent": "explain",
    "AutoInterpRun": "run",
    "LatentResult": "run",
    "interpret_cards": "run",
    "run_autointerp": "run",
}


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
__getattr__ = lazy_exports(__name__, _WHERE)
