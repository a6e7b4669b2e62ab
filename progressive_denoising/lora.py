"""LoRA adapters for PDM with peft: `add_adapter`, `set_adapter(s)`, `disable_adapters` / `enable_adapters`,
`fuse_lora` / `unfuse_lora`, `unload_lora`, and saving / loading the adapter alone (one safetensors file).

transformers 5 gives every `PreTrainedModel` these methods (`PeftAdapterMixin`), but its versions ask for peft >= 0.22,
later than the peft on the package index; diffusers' `PeftAdapterMixin` is written for its `ModelMixin`. This mixin
does what both do with peft's model-agnostic functions (`inject_adapter_in_model`, `get_peft_model_state_dict`,
`set_peft_model_state_dict`, the layers' `merge` / `set_adapter`), which peft >= 0.13 has, under diffusers' and
transformers' method names. It comes before `PreTrainedModel` in the model's bases, so its methods are the ones called.

peft is imported inside a `try` block (`_peft`): transformers asks for every module a remote-code file imports to be
installed, and skips those in `try` blocks, so a saved folder loads without peft until an adapter is used.

A saved adapter is `pytorch_lora_weights.safetensors` (diffusers' file name): peft's state dict without the adapter's
name (`decoder.layers.0.self_attn.q_proj.lora_A.weight`, (r, in); `...lora_B.weight`, (out, r)), with the
`LoraConfig` as JSON and the base model's name in the file's metadata.
"""

import json
import os
import re
from typing import Dict, List, Optional, Union

import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The decoder's projections, as suffixes of module names: the attention's (self- and cross-attention) and the MLP's
# two linear layers (`mlp.0` up, `mlp.2` down). The heads are left out: they stay the base model's.
DECODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.0", "mlp.2")
# T5's attention and feed-forward projections (`wi_0` / `wi_1` in gated T5 v1.1).
TEXT_ENCODER_TARGET_MODULES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
METADATA_CONFIG_KEY = "lora_config"
METADATA_BASE_KEY = "base_model"


def _peft():
    """The peft package, or an ImportError that says how to install it."""
    try:
        import peft
        import peft.tuners.tuners_utils
    except ImportError as error:
        raise ImportError("LoRA adapters need peft: pip install 'progressive-denoising[lora]' (or pip install "
                          "'peft>=0.13')") from error
    return peft


def target_modules_pattern(target_modules=DECODER_TARGET_MODULES, text_encoder: bool = False) -> str:
    """A regular expression (peft's `target_modules` as a string: matched against whole module names) for the
    decoder layers' modules whose names end in one of `target_modules`, and with `text_encoder` T5's projections.

    Whole names keep a short name such as `q_proj` or `o` from matching a module elsewhere (a head, the other half).
    """
    names = "|".join(re.escape(name) for name in target_modules)
    parts = [rf"decoder\.layers\.\d+\.(?:.*\.)?(?:{names})"]
    if text_encoder:
        t5 = "|".join(TEXT_ENCODER_TARGET_MODULES)
        parts.append(rf"text_encoder\.encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention|DenseReluDense)\.(?:{t5})")
    return "|".join(f"(?:{part})" for part in parts)


def lora_config(r: int = 8, lora_alpha: Optional[float] = None, target_modules=DECODER_TARGET_MODULES,
                text_encoder: bool = False, lora_dropout: float = 0.0, init_lora_weights=True):
    """A peft `LoraConfig` for PDM: rank `r`, `lora_alpha` (default `r`: scale 1) on the decoder's
    `target_modules` (and T5's projections with `text_encoder`)."""
    peft = _peft()
    return peft.LoraConfig(r=r, lora_alpha=r if lora_alpha is None else lora_alpha, lora_dropout=lora_dropout,
                           target_modules=target_modules_pattern(target_modules, text_encoder),
                           init_lora_weights=init_lora_weights)


def _tuner_layers(model: nn.Module):
    base = _peft().tuners.tuners_utils.BaseTunerLayer
    return [module for module in model.modules() if isinstance(module, base)]


def _check_adapters(model, names: List[str]):
    configs = model._adapter_configs()
    missing = [name for name in names if name not in configs]
    if missing:
        raise ValueError(f"no adapter named {', '.join(map(repr, missing))}; the model has {list(configs) or 'none'}")


class PDMLoraMixin:
    """The adapter methods of `PDMForTextToImage` (and the autoregressive baseline): see the module's docstring.

    `peft_config` maps the adapter names to their `LoraConfig`s (as in transformers and diffusers); there is none
    (an AttributeError, as `hasattr` expects) without adapters.
    """

    @property
    def peft_config(self) -> Dict[str, object]:
        configs = self.__dict__.get("_peft_configs")
        if not configs:  # `hasattr(model, "peft_config")` is how peft, transformers and diffusers ask for adapters
            raise AttributeError("the model has no adapters")
        return configs

    @peft_config.setter
    def peft_config(self, value):  # peft's tuner assigns it to the model it injects into
        self.__dict__["_peft_configs"] = dict(value)

    def _adapter_configs(self) -> Dict[str, object]:
        return self.__dict__.get("_peft_configs") or {}

    @property
    def _hf_peft_config_loaded(self) -> bool:
        return bool(self._adapter_configs())

    @_hf_peft_config_loaded.setter
    def _hf_peft_config_loaded(self, value):  # transformers sets it; whether adapters exist is read off peft_config
        pass

    def add_adapter(self, adapter_config, adapter_name: str = "default"):
        """Add a fresh adapter (a peft `LoraConfig`, e.g. from `lora_config`) and make it the active one; only adapter
        weights train afterwards (peft sets `requires_grad` off everywhere else)."""
        peft = _peft()
        if adapter_name in self._adapter_configs():
            raise ValueError(f"an adapter named {adapter_name!r} exists already: pass another adapter_name")
        if not isinstance(adapter_config, peft.PeftConfig):
            raise ValueError(f"adapter_config must be a peft PeftConfig (LoraConfig), got {type(adapter_config)}")
        configs = dict(self._adapter_configs())
        peft.inject_adapter_in_model(adapter_config, self, adapter_name)
        self.peft_config = {**configs, adapter_name: adapter_config}
        self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: Union[str, List[str]]):
        """Make `adapter_name` (or every name of a list) the active adapter(s); the others stay loaded, unused. peft
        makes the active adapters' weights trainable and the others frozen."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        _check_adapters(self, names)
        for layer in _tuner_layers(self):
            layer.set_adapter(names)

    def set_adapters(self, adapter_names: Union[str, List[str]], weights: Optional[Union[float, List[float]]] = None):
        """Activate `adapter_names` together, each scaled by its weight (diffusers' `set_adapters`; 1.0 by default):
        the outputs of the adapted layers add `weight * alpha / r * B A x` per adapter."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [1.0] * len(names) if weights is None else weights
        weights = [weights] * len(names) if isinstance(weights, (int, float)) else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters")
        self.set_adapter(names)
        for layer in _tuner_layers(self):
            for name, weight in zip(names, weights):
                if hasattr(layer, "set_scale") and name in layer.scaling:
                    layer.set_scale(name, weight)

    def active_adapters(self) -> List[str]:
        for layer in _tuner_layers(self):
            active = layer.active_adapter
            return [active] if isinstance(active, str) else list(active)
        return []

    def disable_adapters(self):
        """Run the base model alone (the adapters stay loaded): its outputs bit for bit, as long as nothing is fused."""
        for layer in _tuner_layers(self):
            layer.enable_adapters(False)

    def enable_adapters(self):
        for layer in _tuner_layers(self):
            layer.enable_adapters(True)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Optional[List[str]] = None):
        """Add `lora_scale * alpha / r * B A` of the active adapters (or `adapter_names`) to the base weights: one
        matrix product per layer again, the same outputs up to float rounding. `unfuse_lora` subtracts it."""
        if lora_scale == 0:  # nothing to add; a zero scale could not be divided out again by `unfuse_lora`
            return
        # The layers stay scaled while fused: `unfuse_lora` subtracts what was added, then scales them back.
        self.__dict__["_fused_lora_scale"] = lora_scale
        for layer in _tuner_layers(self):
            if lora_scale != 1.0:
                layer.scale_layer(lora_scale)
            layer.merge(safe_merge=safe_fusing, adapter_names=adapter_names)

    def unfuse_lora(self):
        scale = self.__dict__.pop("_fused_lora_scale", 1.0)
        for layer in _tuner_layers(self):
            if layer.merged:
                layer.unmerge()
            if scale != 1.0:
                layer.unscale_layer(scale)

    def delete_adapters(self, adapter_names: Union[str, List[str]]):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        _check_adapters(self, names)
        if set(names) == set(self._adapter_configs()):
            return self.unload_lora()
        for layer in _tuner_layers(self):
            for name in names:
                layer.delete_adapter(name)
        self.peft_config = {k: v for k, v in self._adapter_configs().items() if k not in names}

    def unload_lora(self):
        """Remove every adapter: the LoRA layers give way to the linear layers they wrap, so the model is the base
        model again, module for module. Fused adapters stay in those weights (diffusers' `fuse_lora` then
        `unload_lora_weights`: a merged model, saved as any other)."""
        layers = {id(layer) for layer in _tuner_layers(self)}
        for name, module in list(self.named_modules()):
            if id(module) in layers:
                parent_name, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent_name) if parent_name else self, child, module.get_base_layer())
        self.peft_config = {}

    def text_encoder_has_adapters(self) -> bool:
        """True when an adapter sits in the T5 encoder: its states need gradients even when it is frozen."""
        return any(isinstance(m, _peft().tuners.tuners_utils.BaseTunerLayer) for m in self.text_encoder.modules()) \
            if self._adapter_configs() else False

    def save_pretrained(self, *args, **kwargs):
        """A model with adapters would be saved under peft's names (`q_proj.base_layer.weight`), which no model
        loads: save the adapter alone, or fold it in and remove the LoRA layers first."""
        if self._adapter_configs():
            raise ValueError("the model holds LoRA adapters: save them with save_lora_adapter (a pipeline: "
                             "save_lora_weights), or call fuse_lora() and unload_lora() first to save a merged model")
        return super().save_pretrained(*args, **kwargs)

    # -- saving and loading the adapter alone ---------------------------------------------------------------------

    def get_adapter_state_dict(self, adapter_name: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """The adapter's weights alone (default: the first active one), named without the adapter's name."""
        adapter_name = adapter_name or (self.active_adapters() or [None])[0]
        _check_adapters(self, [adapter_name])
        return _peft().get_peft_model_state_dict(self, adapter_name=adapter_name)

    def save_lora_adapter(self, save_directory: Union[str, os.PathLike], adapter_name: Optional[str] = None,
                          weight_name: str = LORA_WEIGHT_NAME, base_model: Optional[str] = None) -> str:
        """Write the adapter alone to `save_directory/weight_name` (safetensors, the `LoraConfig` in its metadata);
        returns the file's path. `base_model` (default: the model's `name_or_path`) is recorded as the model it
        was trained for."""
        from safetensors.torch import save_file

        adapter_name = adapter_name or (self.active_adapters() or [None])[0]
        state_dict = self.get_adapter_state_dict(adapter_name)
        config = self._adapter_configs()[adapter_name].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        metadata = {METADATA_CONFIG_KEY: json.dumps(config, default=str),
                    METADATA_BASE_KEY: str(base_model or getattr(self, "name_or_path", "") or "")}
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, weight_name)
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path, metadata=metadata)
        return path

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs) -> str:
        """Load a saved adapter (a file, a folder holding `weight_name`, or a Hub repository) as `adapter_name`
        (default `default_0`, `default_1`, ...) and make it the active one; returns the name.

        An adapter trained for another base model (a target module this model lacks, or other shapes), or a file that
        is not a readable safetensors adapter, raises a ValueError naming the file; nothing is added then.
        """
        path = resolve_adapter_file(pretrained_model_name_or_path_or_dict, weight_name, **hub_kwargs)
        state_dict, metadata = read_adapter_file(path)
        check_adapter_fits(self, state_dict, path)
        config = adapter_config(state_dict, metadata, path)
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(self._adapter_configs()) + 1)
                                if f"default_{i}" not in self._adapter_configs())
        grads = {id(p): p.requires_grad for p in self.parameters()}
        self.add_adapter(config, adapter_name)
        result = _peft().set_peft_model_state_dict(self, state_dict, adapter_name=adapter_name)
        # peft freezes every base weight when it injects: loading an adapter leaves the others as they were.
        for p in self.parameters():
            if id(p) in grads:
                p.requires_grad_(grads[id(p)])
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            self.delete_adapters(adapter_name)
            raise ValueError(f"{path}: not an adapter of this model: no place for {unexpected[0]} "
                             f"({len(unexpected)} weights)")
        return adapter_name


def resolve_adapter_file(path_or_repo, weight_name: str = LORA_WEIGHT_NAME, **hub_kwargs) -> str:
    """The local adapter file of a file path, a folder holding `weight_name`, or a Hub repository id."""
    path = os.fspath(path_or_repo)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        candidate = os.path.join(path, weight_name)
        if not os.path.isfile(candidate):
            raise ValueError(f"{candidate}: no LoRA adapter file in the folder {path}")
        return candidate
    if path.endswith(".safetensors") or os.sep in path and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ValueError(f"{path}: no such LoRA adapter file")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, weight_name, **hub_kwargs)


def read_adapter_file(path: str):
    """(weights, metadata) of a safetensors adapter file; a ValueError naming it when it is no such file (damaged,
    truncated, empty or not LoRA weights)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types on a truncated or corrupt header
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a readable safetensors adapter file ({first})") from error
    if not any(".lora_A." in key for key in state_dict):
        raise ValueError(f"{path}: holds no LoRA weights (no '.lora_A.' keys among {len(state_dict)} tensors)")
    return state_dict, metadata


def check_adapter_fits(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str):
    """A ValueError naming `path` unless every adapted module exists in `model` as a linear layer whose sizes the
    LoRA matrices fit: lora_A (r, in_features), lora_B (out_features, r)."""
    modules = dict(model.named_modules())
    for key, tensor in state_dict.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            continue
        name, which = match.groups()
        module = modules.get(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{path}: adapter for another base model: it adapts {name}, which this model does not "
                             "have as a linear layer")
        expected = base.in_features if which == "A" else base.out_features
        got = tensor.shape[1] if which == "A" else tensor.shape[0]
        if tensor.dim() != 2 or got != expected:
            raise ValueError(f"{path}: adapter for another base model: {key} has shape {tuple(tensor.shape)}, but "
                             f"{name} has {base.in_features} inputs and {base.out_features} outputs")


def adapter_config(state_dict: Dict[str, torch.Tensor], metadata: Dict[str, str], path: str):
    """The `LoraConfig` of a saved adapter: from its metadata, else read off its weights (rank, targets, alpha = r)."""
    peft = _peft()
    if METADATA_CONFIG_KEY in metadata:
        try:
            config = json.loads(metadata[METADATA_CONFIG_KEY])
        except ValueError as error:
            raise ValueError(f"{path}: the LoRA config in its metadata is not JSON ({error})") from error
        known = set(peft.LoraConfig.__dataclass_fields__)
        return peft.LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    ranks = {key: t.shape[0] for key, t in state_dict.items() if key.endswith(".lora_A.weight")}
    targets = sorted(key[: -len(".lora_A.weight")] for key in ranks)
    r = max(ranks.values())
    return peft.LoraConfig(r=r, lora_alpha=r, target_modules="|".join(re.escape(t) for t in targets))
