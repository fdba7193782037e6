"""The code a saved TransfusionPipeline carries, and how the pipeline loads from a folder or a Hub repo id.

A mixin of [`TransfusionPipeline`] that overrides diffusers' `DiffusionPipeline` saving and loading (so it comes before
`DiffusionPipeline` among the pipeline's bases): `save_pretrained` also writes the pipeline's modules beside
model_index.json and names them there the way diffusers names custom code, so `DiffusionPipeline.from_pretrained(
repo_or_dir, trust_remote_code=True)` loads the pipeline where transfusion_hf is not installed, while
`TransfusionPipeline.from_pretrained` keeps building the package's classes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from transformers.dynamic_module_utils import custom_object_save

from .modeling_transfusion import TransfusionForMixedModal

# Pickle-based weight files, never downloaded by `from_pretrained`.
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]


class TransfusionRemoteCodeMixin:
    """Saving with the code (`save_config`, `to_json_string`) and loading the package's classes from it
    (`load_config`, `extract_init_dict`, `from_pretrained`), for a `DiffusionPipeline` subclass."""

    # A saved pipeline carries its code, named in model_index.json the way diffusers names custom pipelines and
    # components: `_class_name` ["pipeline_transfusion", "TransfusionPipeline"] (the pipeline's module and the modules
    # it imports, at the root) and transformer ["modeling_transfusion", "TransfusionForMixedModal"] (transformers' copy
    # of the model code in transformer/, from `register_for_auto_class`). `DiffusionPipeline.from_pretrained(
    # repo_or_dir, trust_remote_code=True)` then loads it where transfusion_hf is not installed.
    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' `save_config` (model_index.json, the last file `save_pretrained` writes), with the pipeline
        class's module and the modules it imports (recursively; transformers' `custom_object_save`) saved beside it."""
        os.makedirs(save_directory, exist_ok=True)
        custom_object_save(self, save_directory)  # warns and saves nothing for a class defined in __main__
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json, with the pipeline class and the transformer named by the code files saved with them."""
        index = json.loads(super().to_json_string())
        module = type(self).__module__
        if module != "__main__":
            index["_class_name"] = [module.rsplit(".", 1)[-1], type(self).__name__]
        library, class_name = index.get("transformer") or (None, None)
        # diffusers records a class from outside its loadable libraries by its module path; transformers saved that
        # module in transformer/ when the class is registered for an Auto class.
        has_code = getattr(getattr(self, "transformer", None), "_auto_class", None) is not None
        if has_code and library not in (None, "__main__", *LOADABLE_CLASSES):
            index["transformer"] = [library.rsplit(".", 1)[-1], class_name]
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        **kwargs,
    ) -> dict[str, Any] | tuple[dict[str, Any], ...]:
        """diffusers' `load_config`, reading the code entry `_class_name` ["pipeline_transfusion", ...] as this class:
        `TransfusionPipeline.from_pretrained` builds this class, as a diffusers pipeline class builds itself, rather
        than importing the copy of its code in the folder (which diffusers does for a list `_class_name`)."""
        loaded = super().load_config(
            pretrained_model_name_or_path,
            return_unused_kwargs=return_unused_kwargs,
            return_commit_hash=return_commit_hash,
            **kwargs,
        )
        index = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(index.get("_class_name"), list):
            index["_class_name"] = index["_class_name"][-1]
        return loaded

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs) -> tuple[dict[str, Any], dict, dict]:
        """diffusers' `extract_init_dict`, reading the transformer's code entry ["modeling_transfusion",
        "TransfusionForMixedModal"] as the model class this module imports (by its module path, which diffusers
        resolves among the imported modules). Called on the pipeline class whether it was imported from
        transfusion_hf or from the code saved in the folder, so the transformer is always that module's class.
        diffusers 0.42 would otherwise import transformer/modeling_transfusion.py again, which fails for a Hub repo:
        its download fetches only that file of transformer/, not the modules it imports."""
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        module, class_name = TransfusionForMixedModal.__module__, TransfusionForMixedModal.__name__
        if list(init_dict.get("transformer") or ()) == [module.rsplit(".", 1)[-1], class_name]:
            init_dict["transformer"] = [module, class_name]
        return init_dict, unused_kwargs, hidden_dict

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
        """Load from a local folder or a Hub repo id (downloaded first: diffusers' own download of a repo would import
        the pipeline code saved in it, which needs `trust_remote_code=True`, instead of building this class).

        Args:
            pretrained_model_name_or_path: a folder written by `save_pretrained`, or a repo id.
            kwargs: `revision`, `token`, `cache_dir`, `local_files_only` for the download; the rest goes to
                `DiffusionPipeline.from_pretrained` (`torch_dtype`, component overrides such as `scheduler=`).
        """
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
            download_kwargs = {key: kwargs.pop(key) for key in download_keys if key in kwargs}
            # Weights travel as safetensors only: pickled files are never fetched, so never unpickled.
            path = snapshot_download(path, ignore_patterns=PICKLE_PATTERNS, **download_kwargs)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(path, **kwargs)


__all__ = ["PICKLE_PATTERNS", "TransfusionRemoteCodeMixin"]
