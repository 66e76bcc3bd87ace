"""Shared test data of the benchmark tests: a stored benchmark result (no generation)."""

from ace_diffusers.bench.efficacy_plans import ATTACK_NAMES, METHODS

H = {"base": 0.05, "ace_cf": 0.80, "ace_full": 0.95, "uce": 0.70, "esd_x": 0.60}
SECONDS = {"base": None, "ace_cf": 1.0, "ace_full": 5.0, "uce": 0.5, "esd_x": 80.0}
ACC_E = {"base": 0.98, "ace_cf": 0.20, "ace_full": 0.05, "uce": 0.30, "esd_x": 0.10}
HITS = {"base": 8, "ace_cf": 3, "ace_full": 1, "uce": 4, "esd_x": 2}  # of 8 images per attack and erasure


def _method(method: str, concepts: list[str]) -> dict:
    attacks = {
        a: {"asr": HITS[method] / 8, "n": 8, "hits": HITS[method]}
        for a in ATTACK_NAMES
        if not (method == "base" and a == "soft_prompt")
    }
    metrics = {"acc_e": ACC_E[method], "acc_g": 0.1, "acc_s": 0.97, "colour": 0.9, "h": H[method]}
    per = {c: {"metrics": metrics, "attacks": attacks} for c in concepts}
    pooled = {
        a: {"hits": v["hits"] * len(concepts), "n": 8 * len(concepts), "asr": v["asr"]}
        for a, v in attacks.items()
    }
    return {"seconds": SECONDS[method], "details": {}, "concepts": per, "metrics": metrics, "attacks": pooled}


def fake_result() -> dict:
    """What ``ace-diffusers bench`` stores: two single shapes, a 3-concept adapter, speed and inference."""
    erasures = []
    for concepts, kind in (
        (["circle"], "single"),
        (["square"], "single"),
        (["circle", "square", "triangle"], "multi"),
    ):
        erasures.append(
            {
                "label": "+".join(concepts),
                "kind": kind,
                "concepts": concepts,
                "arguments": {},
                "methods": {m: _method(m, concepts) for m in METHODS},
            }
        )
    plan = {
        "shapes": ["circle", "square"],
        "multi": {"1": ["circle"], "3": ["circle", "square", "triangle"]},
        "colours": ["red", "blue"],
        "images_per_prompt": 1,
        "ace_steps": 100,
        "esd_steps": 60,
        "esd_trajectories": 2,
        "esd_prompts": 4,
        "soft_prompts": 1,
        "soft_steps": 20,
        "seed": 0,
        "batch_size": 64,
        "sampler": {},
    }
    return {
        "command": "ace-diffusers bench --quick",
        "machine": "test machine",
        "seconds": 812.0,
        "sections": {
            "efficacy": {
                "plan": plan,
                "methods": dict(METHODS),
                "sampler": {"num_inference_steps": 25},
                "soft_prompt": {"steps": 20, "objective": "denoiser", "target": "teacher"},
                "images": {},
                "erasures": erasures,
                "multi": {"1": "circle", "3": "circle+square+triangle"},
                "seconds": 600.0,
            },
            "speed": {
                "seconds": 70.0,
                "closed_form": {
                    "model": "SD1.5-shaped",
                    "build_seconds": 30.0,
                    "peak_extra_rss_mb": 120.0,
                    "rows": [
                        {
                            "concepts": 1,
                            "rank": 32,
                            "fits_per_timing": 5,
                            "cold_seconds": 2.1,
                            "cold_seconds_per_concept": 2.1,
                            "preparation_seconds": 1.7,
                            "new_process_seconds": 0.45,
                            "new_process_seconds_per_concept": 0.45,
                            "warm_seconds": 0.55,
                            "warm_seconds_per_concept": 0.55,
                            "adapter_mb_fp16": 3.05,
                            "cold_seconds_range": [2.0, 2.4],
                            "new_process_seconds_range": [0.4, 0.5],
                            "warm_seconds_range": [0.5, 0.6],
                        },
                        {
                            "concepts": 10,
                            "rank": 104,
                            "cold_seconds": 7.0,
                            "cold_seconds_per_concept": 0.7,
                            "warm_seconds": 5.0,
                            "warm_seconds_per_concept": 0.5,
                            "adapter_mb_fp16": 9.85,
                        },
                        {
                            "concepts": 100,
                            "rank": 256,
                            "cold_seconds": 21.0,
                            "cold_seconds_per_concept": 0.21,
                            "preparation_seconds": 1.9,
                            "new_process_seconds": 19.0,
                            "new_process_seconds_per_concept": 0.19,
                            "warm_seconds": 18.0,
                            "warm_seconds_per_concept": 0.18,
                            "adapter_mb_fp16": 24.2,
                        },
                    ],
                },
            },
            "inference": {
                "seconds": 120.0,
                "overhead": {
                    "latent": 16,
                    "rounds": 5,
                    "threads": 2,
                    "model": "SD1.5-shaped UNet",
                    "median_seconds": {
                        "stock": 1.0,
                        "ACE 1": 1.02,
                        "ACE 10": 1.04,
                        "ACE 100": 1.12,
                        "fused": 1.0,
                    },
                    "ratio_vs_stock": {
                        "stock": 1.0,
                        "ACE 1": 1.02,
                        "ACE 10": 1.04,
                        "ACE 100": 1.12,
                        "fused": 1.0,
                    },
                },
                "sizes": [
                    {
                        "model": "SD1.5",
                        "layers": 16,
                        "concepts": 1,
                        "rank": 32,
                        "parameters": 1600000,
                        "mb_fp16": 3.05,
                        "kb_fp16_per_concept": 3125.0,
                    }
                ],
            },
        },
    }
