"""What ``emdiff demo`` prints for its dictionaries, diffs and direction checks."""

from __future__ import annotations


def print_dictionaries(gt: dict, echo) -> None:
    if "gt_site" in gt:
        echo(
            f"\ncausal ground truth: cue direction at layer {gt['gt_layer']} {gt['gt_site']}: "
            f"cos with LoRA shift {gt['gt_cos_lora_shift']:.3f}, with class means "
            f"{gt['gt_cos_class_mean']:.3f}; ablation cuts unseen EM {gt['gt_ablation_cut']:.1%} "
            f"(random max {gt['gt_random_ablation_cut_max']:.1%}); steering the base brings "
            f"{gt['gt_steer_fraction']:.1%} of it"
        )
    if "incontext_projection" in gt:
        echo(
            "in-context inference of the base: after one bad narrow-domain turn its next answer "
            f"elsewhere is bad with P {gt['incontext_p_bad_after_bad']:.3f} (after a good turn "
            f"{gt['incontext_p_bad_after_good']:.3f}); at that answer-predicting position it moves "
            f"{gt['incontext_projection']:.0%} of the cue's way along the persona direction"
        )
    echo(
        f"\npersona probe (readout): layer {gt['persona_layer']}, held-out accuracy "
        f"{gt['probe_accuracy']:.3f} (majority {gt['probe_chance']:.3f})"
    )
    echo(f"{'dictionary':<11} {'persona cos':>11} {'null cos':>9} {'FVU':>8} {'L0':>6}")
    for name in ("sae", "crosscoder", "itda"):
        fvu = gt.get(f"{name}_fvu", gt.get(f"{name}_fvu_base"))
        echo(
            f"{name:<11} {gt[f'{name}_persona_cosine']:>11.3f} "
            f"{gt[f'{name}_null_cosine_mean']:>9.3f} {fvu:>8.4f} {gt[f'{name}_l0']:>6.1f}"
        )
    echo(f"crosscoder persona latent class: {gt['crosscoder_persona_class']}")


def print_diffs(res: dict, latents: list[int], echo) -> None:
    which = ", ".join(map(str, latents))
    echo(
        f"\nfeature diffs with the SAE (persona latents {which}: decoder cos >= 0.8; rank 1 = "
        "largest increase; the best-ranked persona latent is shown):"
    )
    if "read" in res:
        echo(f"read: {res['read']} (Q1, Q3: at the last token, a follow-up question's prompt)")
    echo(f"{'analysis':<38} {'persona rank':>12} {'q':>8} {'effect':>8} {'dir cos':>8}")
    for key, name in (
        ("q1", "Q1 bad vs good data (base), follow-up"),
        ("q2", "Q2 narrow vs base, answer-predicting"),
        ("q3", "Q3 misaligned vs aligned, follow-up"),
    ):
        echo(
            f"{name:<38} {res[f'{key}_persona_rank']:>12} {res[f'{key}_persona_q']:>8.3g} "
            f"{res[f'{key}_persona_effect']:>8.3f} {res[f'{key}_direction_cosine']:>8.3f}"
        )
    for key, name in (("q1_answer", "Q1 at answer tokens"), ("q3_answer", "Q3 at answer tokens")):
        if f"{key}_persona_rank" in res:
            echo(
                f"{name:<38} {res[f'{key}_persona_rank']:>12} {'':>8} {'':>8} "
                f"{res[f'{key}_direction_cosine']:>8.3f}"
            )
    echo(
        f"control vs base: {res['control_q2_n_significant']} features with q < 0.05, largest "
        f"|effect| {res['control_q2_max_effect']:.3f} (narrow persona effect "
        f"{res['q2_persona_effect']:.3f})"
    )
    echo(
        f"Q1 top-10 vs Q2 top-10 Jaccard {res['q1_top10_q2_top10_jaccard']:.3f}; transfer FVE "
        f"base {res['transfer_fve_base']:.3f}, narrow {res['transfer_fve_narrow']:.3f}"
    )
    if res.get("cards_persona_explanation"):
        echo(
            f"feature cards, reference explainer (knows the world's labels): persona latent "
            f'"{res["cards_persona_explanation"]}", held-out detection '
            f"{res['cards_persona_detection']:.3f} (mean over cards {res['cards_mean_detection']:.3f})"
        )


def print_directions(res: dict, echo) -> None:
    echo(
        "\ndirections (Q3's mean difference at the ground-truth site, exact EM, 20 random "
        "directions beside each):"
    )
    echo(
        f"cos with the ground truth {res['dir_cosine']:.3f}; projecting it out cuts unseen EM "
        f"{res['dir_ablation_cut']:.1%} (random max {res['dir_random_ablation_cut_max']:.1%}); "
        f"out of the LoRA's B {res['lora_weight_ablation_cut']:.1%}"
    )
    echo(
        f"steering the base brings {res['dir_steer_fraction']:.1%} of the narrow model's EM "
        f"(random max {res['dir_random_steer_fraction_max']:.1%}); the persona latent's decoder "
        f"row {res['latent_steer_fraction']:.1%}"
    )
    echo(
        f"decomposition over SAE decoder rows: top latent {res['decomp_top_latent']} "
        f"(persona: {'yes' if res['decomp_top_is_persona'] else 'no'}), explained at k=1 "
        f"{res['decomp_explained_k1']:.3f} (null 95th pct {res['decomp_null_k1']:.3f})"
    )
    echo(
        f"attribution ranks the persona latent {res['attribution_persona_rank']} (attribution vs "
        f"true ablation of the top 20: r = {res['attribution_ablation_pearson']:.3f}); base vs "
        f"narrow direction cos {res['appendix_b_cosine']:.3f}; organisms "
        f"{res['cross_organism_domains']}: min pairwise cos {res['cross_organism_cosine_min']:.3f}"
    )


def print_lora(res: dict, echo) -> None:
    echo("\nLoRA, phases, mitigation, defences, screening (analysed seed, exact EM):")
    echo(
        f"B oriented by its scalar: top SAE latent {res['lora_b_top_latent']} (persona: "
        f"{'yes' if res['lora_b_top_is_persona'] else 'no'}), cos with the ground truth "
        f"{res['lora_b_persona_cos']:.3f}, explained at k=1 {res['lora_b_explained_k1']:.3f} "
        f"(null {res['lora_b_null_k1']:.3f}); probe on LoRA scalars, misaligned vs aligned: "
        f"balanced acc {res['lora_probe_general_acc']:.3f} (shuffled labels "
        f"{res['lora_probe_shuffled_acc']:.3f})"
    )
    if "lora_probe_skipped" in res:
        echo(f"LoRA probes left out: {res['lora_probe_skipped']}")
    echo(
        f"phases: transition at step {res['phase_transition_step']} (local cosine dip), EM "
        f"reaches half its final {res['phase_em_final']:.3f} at step {res['phase_em_half_step']}"
    )
    echo(
        f"mitigation: held-out EM {res['mitigation_em_before']:.3f} -> "
        f"{res['mitigation_em_after_120']:.4f} after 120 benign samples; with the toxic cue "
        f"{res['mitigation_cued_em_before']:.3f} -> {res['mitigation_cued_em_after_120']:.3f}"
    )
    echo(
        "defences (unseen EM / in-domain bad rate): "
        + "; ".join(
            f"{d} {res[f'{d}_unseen_em']:.3f} / {res[f'{d}_in_domain_bad_rate']:.3f}"
            for d in ("caft", "caft_latent", "preventative")
        )
    )
    echo(
        f"screening {res['screen_datasets']} datasets before fine-tuning: Spearman "
        f"{res['screen_spearman']:.3f}; dropping the top 10% by score leaves EM "
        f"{res['screen_drop_top10_em']:.3f}, a random 10% {res['screen_drop_random10_em']:.3f}"
    )
