"""Names of the per-feature tests the comparisons run (light: the CLI lists them in its help)."""

UNPAIRED: tuple[str, ...] = ("welch", "mannwhitney")
PAIRED: tuple[str, ...] = ("paired_t", "wilcoxon")
