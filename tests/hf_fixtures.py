"""Checkpoints written by transformers itself (random weights moved off their init values), and
an independent PyTorch VILA projector, for parity and round-trip tests."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

torch.set_num_threads(2)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Adds noise to every parameter so no weight sits at its init value (norms != 1, biases !=
    0): a parity test then exercises every tensor and every layout transform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.float().eval()


def qwen2_hf(vocab=97, hidden=48, inter=80, layers=2, heads=6, kv=2, tied=False, theta=5000.0,
             head_dim=None, seed=0) -> Qwen2ForCausalLM:
    kw = {"head_dim": head_dim} if head_dim else {}
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": theta},
                      max_position_embeddings=512, **kw)
    torch.manual_seed(seed)
    return perturb(Qwen2ForCausalLM(cfg), seed)


def siglip_hf(hidden=32, inter=40, layers=3, heads=4, image=28, patch=7, head=True,
              seed=0) -> SiglipVisionModel:
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=image, patch_size=patch,
                             vision_use_head=head)
    torch.manual_seed(seed)
    return perturb(SiglipVisionModel(cfg), seed)


class DownSample2x2Fix(torch.nn.Module):
    """VILA's `flat_square_2x2` as written there: views and permutes on [n, w, h, c]."""

    def forward(self, x):
        n, hw, c = x.shape
        s = int(hw ** 0.5)
        x = x.reshape(n, s, s, c)
        n, w, h, c = x.size()
        if w % 2 == 1:
            x = torch.cat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1)
            n, w, h, c = x.size()
        if h % 2 == 1:
            x = torch.cat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2)
            n, w, h, c = x.size()
        x = x.contiguous().view(n, w, h // 2, c * 2)
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, h // 2, w // 2, c * 4)
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.reshape(n, -1, c * 4)


class VilaProjector(torch.nn.Module):
    """VILA's `mlp_downsample_2x2_fix` module, so its state dict has VILA's names (layers.1 ...)."""

    def __init__(self, dv: int, d: int):
        super().__init__()
        self.layers = torch.nn.Sequential(DownSample2x2Fix(), torch.nn.LayerNorm(4 * dv),
                                          torch.nn.Linear(4 * dv, d), torch.nn.GELU(),
                                          torch.nn.Linear(d, d))

    def forward(self, x):
        return self.layers(x)


def projector_torch(dv: int, d: int, seed=0) -> VilaProjector:
    torch.manual_seed(seed)
    return perturb(VilaProjector(dv, d), seed)


def write_longvila(path: str, llm: Qwen2ForCausalLM, tower: SiglipVisionModel,
                   proj: torch.nn.Module, select_layer: int = -2, vila_prefixes: bool = True):
    """A LongVILA directory: llm/ and vision_tower/ by transformers, mm_projector/ as VILA saves
    it. With `vila_prefixes`, the tower's tensors carry the `vision_model.` prefix of
    transformers-4 checkpoints and the projector's the `mm_projector.` wrapper prefix."""
    llm.save_pretrained(os.path.join(path, "llm"))
    tdir = os.path.join(path, "vision_tower")
    tower.save_pretrained(tdir)
    if vila_prefixes:
        sd = {"vision_model." + k: v.contiguous() for k, v in tower.state_dict().items()}
        os.remove(os.path.join(tdir, "model.safetensors"))
        save_file(sd, os.path.join(tdir, "model.safetensors"), metadata={"format": "pt"})
    pdir = os.path.join(path, "mm_projector")
    os.makedirs(pdir, exist_ok=True)
    prefix = "mm_projector." if vila_prefixes else ""
    save_file({prefix + k: v.contiguous() for k, v in proj.state_dict().items()},
              os.path.join(pdir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(pdir, "config.json"), "w") as f:
        json.dump({"mm_projector_type": "mlp_downsample_2x2_fix", "model_type": "v2l_projector"}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
                   "mm_vision_select_layer": select_layer, "mm_projector": "mlp_downsample_2x2_fix",
                   "video_token_id": 3, "separator_token_id": 5}, f)


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())



def qwen2_5_vl_hf(vocab=131, hidden=64, inter=80, layers=2, heads=4, kv=4, tied=False,
                  head_dim=None, mrope=(2, 3, 3), theta=5000.0, v_hidden=32, v_inter=40,
                  v_depth=3, v_heads=2, window=56, fullatt=(1,), tokens_per_second=2, seed=0):
    """A tiny `Qwen2_5_VLForConditionalGeneration` moved off its init. Window 56 px = 2x2 merged
    units of 14 px patches, so small grids already hold several windows (and ragged ones). The
    special ids sit at the end of the vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    hd = head_dim or hidden // heads
    assert sum(mrope) == hd // 2
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": theta,
                                 "mrope_section": list(mrope)},
                **({"head_dim": head_dim} if head_dim else {}))
    vision = dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=v_inter,
                  num_heads=v_heads, out_hidden_size=hidden, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=window, fullatt_block_indexes=list(fullatt),
                  tokens_per_second=tokens_per_second, in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied,
                           vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3,
                           image_token_id=vocab - 2, video_token_id=vocab - 1)
    torch.manual_seed(seed)
    return perturb(Qwen2_5_VLForConditionalGeneration(cfg), seed)


def write_transformers4_layout(model, path: str) -> None:
    """Saves `model` with the names transformers 4.52-4.x wrote (`model.visual.*`,
    `model.language_model.*`); transformers 5 writes the hub's (`visual.*`, `model.layers.*`)."""
    model.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # the module's own names
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in sd)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for f in os.listdir(path):
        if f.startswith("model") and "safetensors" in f:
            os.remove(os.path.join(path, f))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def video_inputs(model, grids, seed=0):
    """Random `pixel_values_videos` for `video_grid_thw` = grids (patch units)."""
    rs = np.random.RandomState(seed)
    k = 3 * 2 * 14 * 14
    n = sum(t * h * w for t, h, w in grids)
    return torch.tensor(rs.randn(n, k).astype(np.float32)), torch.tensor(grids)
