"""GPT-2's parameter names and shapes, shared by the benchmarks that time averaging at that scale."""

from __future__ import annotations


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> dict:
    """Hugging Face ``GPT2LMHeadModel`` state_dict names and shapes without the tied ``lm_head.weight``:
    124,439,808 parameters at 12 layers."""
    shapes = {"transformer.wte.weight": (vocab, width), "transformer.wpe.weight": (context, width)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (width,), h + "ln_1.bias": (width,),
                       h + "attn.c_attn.weight": (width, 3 * width), h + "attn.c_attn.bias": (3 * width,),
                       h + "attn.c_proj.weight": (width, width), h + "attn.c_proj.bias": (width,),
                       h + "ln_2.weight": (width,), h + "ln_2.bias": (width,),
                       h + "mlp.c_fc.weight": (width, 4 * width), h + "mlp.c_fc.bias": (4 * width,),
                       h + "mlp.c_proj.weight": (4 * width, width), h + "mlp.c_proj.bias": (width,)})
    shapes.update({"transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,)})
    return shapes
