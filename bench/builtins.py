"""Index of the built-in plugins, registered lazily: a module is imported only when its plugin is used.

One line per plugin; a new built-in adds its line here (third-party plugins use the
``mergearena.plugins`` entry-point group instead). The name on each line must be the plugin's own
``name``: the registry checks it when the module is first imported.
"""

from __future__ import annotations

from bench.families.family import variants
from bench.registry import attacks, defenses, families, file_suites, merges, suites

# ---- defenses
defenses.register_lazy("none", "defenses.none:NoDefense")
defenses.register_lazy("mergeguard", "defenses.mergeguard:MergeGuard")
defenses.register_lazy("mergeguard-stage1", "defenses.mergeguard:MergeGuardStage1")
defenses.register_lazy("mergeguard-stage2", "defenses.mergeguard:MergeGuardStage2")
defenses.register_lazy("params", "defenses.params:PaRaMS")
defenses.register_lazy("params+dropout", "defenses.params:PaRaMSDropout")
defenses.register_lazy("mergelock", "defenses.mergelock:MergeLock")
defenses.register_lazy("mergebarrier", "defenses.mergebarrier:MergeBarrier")
defenses.register_lazy("mergebarrier-att", "defenses.mergebarrier:MergeBarrierAttention")
defenses.register_lazy("mergebarrier-ffn", "defenses.mergebarrier:MergeBarrierFFN")
defenses.register_lazy("taylormlp", "defenses.taylormlp:TaylorMLP")

# ---- attacks
attacks.register_lazy("none", "attacks.none:NoAttack")
attacks.register_lazy("realign", "attacks.realign:Realign")
attacks.register_lazy("scale-division", "attacks.scale_division:ScaleDivision")
attacks.register_lazy("anchor-align", "attacks.anchor_align:AnchorAlign")
attacks.register_lazy("anchor-align-indep", "attacks.anchor_align:AnchorAlignIndependent")
attacks.register_lazy("revert-to-base", "attacks.revert:RevertToBase")
attacks.register_lazy("revert-attention", "attacks.revert:RevertAttention")
attacks.register_lazy("revert-ffn", "attacks.revert:RevertFFN")
attacks.register_lazy("taylor-invert", "attacks.taylor_invert:TaylorInvert")
attacks.register_lazy("unmask", "attacks.unmask:Unmask")
attacks.register_lazy("graderase", "attacks.graderase:GradErase")
attacks.register_lazy("merge-finetune", "attacks.merge_finetune:MergeFinetune")

# ---- merge methods
merges.register_lazy("wa", "merges.basic:weight_average")
merges.register_lazy("ta", "merges.basic:task_arithmetic")
merges.register_lazy("ties", "merges.ties:ties")
merges.register_lazy("ties-global", "merges.ties:ties_global")
merges.register_lazy("dare-ta", "merges.dare:dare_task_arithmetic")
merges.register_lazy("dare-ties", "merges.dare:dare_ties")
merges.register_lazy("dare-ties-mergelm", "merges.dare:dare_ties_mergelm")
merges.register_lazy("ta-tuned", "merges.tuned:ta_tuned")
merges.register_lazy("ties-tuned", "merges.tuned:ties_tuned")
merges.register_lazy("dare-ties-tuned", "merges.tuned:dare_ties_tuned")
merges.register_lazy("adamerging-task", "merges.adamerging:adamerging_task")
merges.register_lazy("adamerging-layer", "merges.adamerging:adamerging_layer")

# ---- suites
suites.register_lazy("text-minilm", "tasks.text_minilm:TextMiniLM")
suites.register_lazy("text-mix", "tasks.text_mix:TextMix")
suites.register_lazy("vision-effnet", "tasks.vision_effnet:VisionEffNet")
suites.register_lazy("lm-smollm2", "tasks.lm_smollm2:SmolLM2Suite")
suites.register_lazy("llama2-13b-experts", "tasks.llama2_experts:Llama2Experts")
suites.register_lazy("clip-vit-b32-ta8", "tasks.clip_ta8:ClipViTB32TA8")
suites.register_lazy("clip-vit-l14-ta8", "tasks.clip_ta8:ClipViTL14TA8")
suites.register_lazy("sd15-styles", "tasks.sd15_styles:SD15Styles")

# ---- suites read from a data file (`bench protect|attack --data FILE`), by format
file_suites.register_lazy("jsonl", "tasks.jsonl_text:JsonlTextSuite")

# ---- architecture families
families.register_lazy("bert", "bench.families.bert:BertFamily")
families.register_lazy("efficientnet", "bench.families.efficientnet:EfficientNetFamily")
families.register_lazy("clip-vision", "bench.families.clip:ClipVisionFamily")
families.register_lazy("llama", "bench.families.llama:LlamaFamily")
families.register_lazy("open-clip-vit", "bench.families.open_clip:OpenClipVisionFamily")
families.register_lazy("unet", "bench.families.unet:UNetFamily")

# ---- module variants (structure-changed releases)
variants.register_lazy("taylor-ffn", "defenses.taylor:TAYLOR_FFN")

__all__ = ["attacks", "defenses", "families", "file_suites", "merges", "suites", "variants"]
