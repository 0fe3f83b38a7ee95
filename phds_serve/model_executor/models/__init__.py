"""Declared-k model classes, one architecture a file, keyed by HF architecture name.

``REFUSED_ARCHS`` names MoE architectures whose router is not a top-k prefix
rule: declared k cannot be exact there, so they serve their native k only and
a request for another k is refused with the reason given here.
"""

_PKG = "phds_serve.model_executor.models"

DECLARED_K_MODELS: dict[str, str] = {
    "OlmoeForCausalLM": f"{_PKG}.olmoe:DeclaredKOlmoeForCausalLM",
    "Qwen2MoeForCausalLM": f"{_PKG}.qwen2_moe:DeclaredKQwen2MoeForCausalLM",
    "MixtralForCausalLM": f"{_PKG}.mixtral:DeclaredKMixtralForCausalLM",
    "Qwen3MoeForCausalLM": f"{_PKG}.qwen3_moe:DeclaredKQwen3MoeForCausalLM",
    "Glm4MoeForCausalLM": f"{_PKG}.glm4_moe:DeclaredKGlm4MoeForCausalLM",
    "GptOssForCausalLM": f"{_PKG}.gpt_oss:DeclaredKGptOssForCausalLM",
    "GraniteMoeForCausalLM": f"{_PKG}.granitemoe:DeclaredKGraniteMoeForCausalLM",
    "GraniteMoeSharedForCausalLM": f"{_PKG}.granitemoeshared:DeclaredKGraniteMoeSharedForCausalLM",
    "GraniteMoeHybridForCausalLM": f"{_PKG}.granitemoehybrid:DeclaredKGraniteMoeHybridForCausalLM",
    "DeepseekForCausalLM": f"{_PKG}.deepseek_v2:DeclaredKDeepseekForCausalLM",
    "DeepseekV2ForCausalLM": f"{_PKG}.deepseek_v2:DeclaredKDeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": f"{_PKG}.deepseek_v2:DeclaredKDeepseekV3ForCausalLM",
    "DbrxForCausalLM": f"{_PKG}.dbrx:DeclaredKDbrxForCausalLM",
    "Ernie4_5_MoeForCausalLM": f"{_PKG}.ernie45_moe:DeclaredKErnie4_5_MoeForCausalLM",
    "MiniMaxM2ForCausalLM": f"{_PKG}.minimax_m2:DeclaredKMiniMaxM2ForCausalLM",
    "Qwen3NextForCausalLM": f"{_PKG}.qwen3_next:DeclaredKQwen3NextForCausalLM",
    "BailingMoeForCausalLM": f"{_PKG}.bailing_moe:DeclaredKBailingMoeForCausalLM",
    "BailingMoeV2ForCausalLM": f"{_PKG}.bailing_moe:DeclaredKBailingMoeV2ForCausalLM",
    "Llama4ForCausalLM": f"{_PKG}.llama4:DeclaredKLlama4ForCausalLM",
    "JambaForCausalLM": f"{_PKG}.jamba:DeclaredKJambaForCausalLM",
    "Qwen3VLMoeForConditionalGeneration": f"{_PKG}.qwen3_vl_moe:DeclaredKQwen3VLMoeForConditionalGeneration",
    "AfmoeForCausalLM": f"{_PKG}.afmoe:DeclaredKAfmoeForCausalLM",
    "AXK1ForCausalLM": f"{_PKG}.axk1:DeclaredKAXK1ForCausalLM",
    "BailingMoeV2_5ForCausalLM": f"{_PKG}.bailing_moe_linear:DeclaredKBailingMoeV25ForCausalLM",
    "BailingMoeV3ForCausalLM": f"{_PKG}.bailing_moe_v3:DeclaredKBailingMoeV3ForCausalLM",
    "Cohere2MoeForCausalLM": f"{_PKG}.cohere2_moe:DeclaredKCohere2MoeForCausalLM",
    "ExaoneMoeForCausalLM": f"{_PKG}.exaone_moe:DeclaredKExaoneMoeForCausalLM",
    "ExaoneMoEForCausalLM": f"{_PKG}.exaone_moe:DeclaredKExaoneMoeForCausalLM",
    "Glm4MoeLiteForCausalLM": f"{_PKG}.glm4_moe_lite:DeclaredKGlm4MoeLiteForCausalLM",
    "HYV3ForCausalLM": f"{_PKG}.hy_v3:DeclaredKHYV3ForCausalLM",
    "K2HorizonForCausalLM": f"{_PKG}.k2_horizon:DeclaredKK2HorizonForCausalLM",
    "Lfm2MoeForCausalLM": f"{_PKG}.lfm2_moe:DeclaredKLfm2MoeForCausalLM",
    "MiMoV2FlashForCausalLM": f"{_PKG}.mimo_v2:DeclaredKMiMoV2FlashForCausalLM",
    "MiMoV2ForCausalLM": f"{_PKG}.mimo_v2:DeclaredKMiMoV2ForCausalLM",
    "NemotronHForCausalLM": f"{_PKG}.nemotron_h:DeclaredKNemotronHForCausalLM",
    "NemotronHPuzzleForCausalLM": f"{_PKG}.nemotron_h:DeclaredKNemotronHForCausalLM",
    "PanguProMoEV2ForCausalLM": f"{_PKG}.openpangu:DeclaredKPanguProMoEV2ForCausalLM",
    "PanguUltraMoEForCausalLM": f"{_PKG}.openpangu:DeclaredKPanguUltraMoEForCausalLM",
    "Param2MoEForCausalLM": f"{_PKG}.param2moe:DeclaredKParam2MoEForCausalLM",
    "SarvamMoEForCausalLM": f"{_PKG}.sarvam:DeclaredKSarvamMoEForCausalLM",
    "SarvamMLAForCausalLM": f"{_PKG}.sarvam:DeclaredKSarvamMLAForCausalLM",
    "Step3TextForCausalLM": f"{_PKG}.step3_text:DeclaredKStep3TextForCausalLM",
    "Step3p5ForCausalLM": f"{_PKG}.step3p5:DeclaredKStep3p5ForCausalLM",
    "Gemma4ForCausalLM": f"{_PKG}.gemma4:DeclaredKGemma4ForCausalLM",
    "Qwen3_5MoeForCausalLM": f"{_PKG}.qwen3_5:DeclaredKQwen3_5MoeForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": f"{_PKG}.qwen3_5:DeclaredKQwen3_5MoeForConditionalGeneration",
}
# vLLM's Transformers modelling backend: architectures it serves through it, and
# the backend class itself (``--model-impl transformers``).
_TRANSFORMERS = f"{_PKG}.transformers_moe:DeclaredKTransformersMoEForCausalLM"
DECLARED_K_MODELS.update(
    {
        arch: _TRANSFORMERS
        for arch in (
            "FlexOlmoForCausalLM",
            "HunYuanMoEV1ForCausalLM",
            "MellumForCausalLM",
            "TransformersMoEForCausalLM",
        )
    }
)

_DSV4 = "DeepSeek-V4 hash-routed layers pick experts from token ids, not by a top-k"
REFUSED_ARCHS: dict[str, str] = {
    "PhiMoEForCausalLM": (
        "sparsemixer routing (transformers ignores num_experts_per_tok) is not a top-k prefix rule"
    ),
    "LongcatFlashForCausalLM": "zero experts make k tokens' compute data-dependent, not a top-k prefix",
    "LongcatFlashNgramForCausalLM": "zero experts make k tokens' compute data-dependent, not a top-k prefix",
    "DeepseekV4ForCausalLM": _DSV4,
    "DeepseekV41ForCausalLM": _DSV4,
    "DeepseekV4ForConditionalGeneration": _DSV4,
    "InternS1ProForConditionalGeneration": "per-group expert quotas are not a top-k prefix rule",
}
