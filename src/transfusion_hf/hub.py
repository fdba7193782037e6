"""Share Transfusion models and pipelines on the Hugging Face Hub, with a model card filled from the run.

`TransfusionForMixedModal.push_to_hub` and `TransfusionPipeline.push_to_hub` call the functions below; they work the
same as transformers' `push_to_hub` (`commit_message`, `commit_description`, `private`, `token`, `revision`,
`create_pr`) and write a Transfusion model card (README.md, `transfusion_hf.modelcard_transfusion`) on every push.
Weights are always safetensors.

This module imports neither the model nor the pipeline module (they import it when they push): it works on whatever
has their attributes (duck typing), or on the folders they were saved to.

From the command line (`transfusion_hf.commands.hub`), push a training output folder (the saved pipeline, plus
`training_summary.json`, `metrics.json` and `samples.png` when present) to a repo::

    python -m transfusion_hf.hub outputs/shapes your-name/transfusion-shapes
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects
from transformers.dynamic_module_utils import get_relative_import_files

# The card's names stay importable from here, where they were defined before the card got its own module.
from .modelcard_transfusion import BUILTIN_DATASETS as BUILTIN_DATASETS
from .modelcard_transfusion import TEMPLATE_PATH as TEMPLATE_PATH
from .modelcard_transfusion import build_model_card, card_files, load_run_artifacts, write_model_card

if TYPE_CHECKING:
    # Annotations name the libraries' base classes, not the model and pipeline modules (see above).
    from diffusers import DiffusionPipeline
    from transformers import PreTrainedModel

# Pickle-based weight formats: never pushed (and refused if anything tries to).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


__all__ = [
    "build_model_card",
    "card_files",
    "create_repo",
    "load_run_artifacts",
    "push_model_to_hub",
    "push_pipeline_to_hub",
    "upload_to_hub",
    "write_model_card",
]


# --------------------------------------------------------------------------------------------------- uploading
def create_repo(repo_id: str, *, private: bool | None = None, token: bool | str | None = None) -> str:
    """Create the model repo if needed (`private` only applies to a new repo); returns the full `namespace/name`."""
    return HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id


def _pipeline_code_files(folder: Path, index: Mapping[str, Any]) -> list[str]:
    """The code files of a saved pipeline at the root of `folder`: the module `model_index.json` names in
    `_class_name` (["pipeline_transfusion", "TransfusionPipeline"]) and every module it imports (relative imports,
    recursively, found by transformers' own `get_relative_import_files`), for `trust_remote_code=True` loading."""
    class_name = index.get("_class_name")
    if not isinstance(class_name, list):
        return []  # a pipeline saved before its code was saved with it
    entry = folder / f"{class_name[0]}.py"
    if not entry.is_file():
        raise ValueError(
            f"`{folder}`'s model_index.json names the code file `{entry.name}` (`_class_name`="
            f"{class_name}), but there is no such file beside it."
        )
    return [entry.name, *sorted(Path(path).name for path in get_relative_import_files(entry))]


def _pipeline_file_patterns(folder: str | os.PathLike) -> list[str]:
    """`allow_patterns` for the files of the pipeline saved in `folder`: `model_index.json`, the code files beside it
    and the folders of the components it lists, so that the rest of a training output folder (checkpoints, logs)
    stays local."""
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"`{folder}` holds no saved pipeline (no model_index.json).")
    index = json.loads(index_path.read_text())
    components = [name for name, value in index.items() if not name.startswith("_") and value and value[1]]
    code_files = _pipeline_code_files(Path(folder), index)
    return ["model_index.json", *code_files, *(f"{name}/*" for name in components)]


def upload_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    path_in_repo: str | None = None,
    allow_patterns: str | list[str] | None = None,
    extra_files: Mapping[str, bytes | str | os.PathLike] | None = None,
) -> CommitInfo:
    """Upload `folder` to the model repo `repo_id` in one commit, like transformers' `push_to_hub` does.

    The repo is created if needed; a `revision` that names a new branch is created from `main` first; `create_pr`
    opens a pull request (against `revision` when given) instead of committing. Pickle-based weight files are
    refused.

    Args:
        folder: the local folder.
        repo_id (`str`): `name` (in your namespace) or `namespace/name`.
        path_in_repo (`str`, *optional*): the repo folder to upload into (default: the root).
        allow_patterns (*optional*): only the files of `folder` matching these (huggingface_hub's patterns).
        extra_files (*optional*): `{path in the repo: bytes or local file}` uploaded in the same commit (a card).

    Returns:
        [`huggingface_hub.CommitInfo`]: a `str` (the commit URL), with `.oid` and `.pr_url` for a pull request.
    """
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    local = [path.relative_to(folder).as_posix() for path in sorted(Path(folder).rglob("*")) if path.is_file()]
    files: dict[str, bytes | str] = {
        name: str(Path(folder) / name) for name in filter_repo_objects(local, allow_patterns=allow_patterns)
    }
    files.update(
        {
            name: content if isinstance(content, bytes) else str(content)
            for name, content in (extra_files or {}).items()
        }
    )
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(f"Refusing to push pickle-based files (safetensors only): {pickles}.")
    repo_id = create_repo(repo_id, private=private, token=token)
    api = HfApi()
    if revision is not None and not revision.startswith("refs/pr/"):
        try:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        except HfHubHTTPError as error:
            # Without write access a pull request can still target an existing branch (as in transformers).
            if not (create_pr and error.response is not None and error.response.status_code == 403):
                raise
    operations = [
        CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=content) for name, content in files.items()
    ]
    # `create_commit`, not `upload_folder`: only it opens a pull request against a branch other than `main`.
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload folder using huggingface_hub",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def push_model_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **card_kwargs,
) -> CommitInfo:
    """`TransfusionForMixedModal.push_to_hub`: transformers' arguments and behaviour, plus the Transfusion card.

    `model` is anything with the model's `save_pretrained`, `config` and `num_parameters`. `card_kwargs` go to
    [`build_model_card`] (`output_dir`, `metrics`, `license`, `base_model`, `datasets`, ...).
    """
    repo_id = create_repo(repo_id, private=private, token=token)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return upload_to_hub(
            folder,
            repo_id,
            commit_message=commit_message or f"Upload {type(model).__name__}",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            extra_files=card_files(model, repo_id, tags=tags, **card_kwargs),
        )


def push_pipeline_to_hub(
    pipeline: DiffusionPipeline | str | os.PathLike,
    repo_id: str,
    *,
    output_dir: str | os.PathLike | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    subfolder: str | None = None,
    **card_kwargs,
) -> CommitInfo:
    """Push a [`TransfusionPipeline`] (all components, safetensors) and its model card to `repo_id`.

    Args:
        pipeline: the pipeline, or a folder it was saved to: that folder's pipeline files (`model_index.json` and
            the component folders) are pushed as they are, without loading them; `output_dir` then defaults to it.
        repo_id (`str`): `name` (in your namespace) or `namespace/name`.
        output_dir (*optional*): the training output folder: `training_summary.json`, `metrics.json` and
            `samples.png` there go into the card (the image is uploaded too). Nothing else of it is uploaded.
        commit_message, commit_description, private, token, revision, create_pr: as in transformers'
            `push_to_hub` (`revision`: the branch to push to, created from `main` if new).
        variant, max_shard_size: passed to `save_pretrained` (a pipeline object only).
        subfolder (*optional*): push into this folder of the repo, without a card (as diffusers does).
        card_kwargs: for [`build_model_card`] (`license`, `base_model`, `datasets`, `tags`, `metrics`, ...).

    Returns:
        [`huggingface_hub.CommitInfo`]: a `str` (the commit URL), with `.oid` and `.pr_url`.
    """
    is_folder = isinstance(pipeline, (str, os.PathLike))
    if is_folder and (variant is not None or max_shard_size is not None):
        raise ValueError(
            f"`variant`={variant!r} and `max_shard_size`={max_shard_size!r} apply when saving a pipeline object; "
            f"the saved folder `{pipeline}` is pushed as it is."
        )
    if is_folder:
        _pipeline_file_patterns(pipeline)  # a folder without a saved pipeline fails before any repo is created
    repo_id = create_repo(repo_id, private=private, token=token)
    with tempfile.TemporaryDirectory() as temporary:
        if is_folder:
            folder, output_dir = Path(pipeline), pipeline if output_dir is None else output_dir
        else:
            folder = Path(temporary)
            pipeline.save_pretrained(folder, safe_serialization=True, variant=variant, max_shard_size=max_shard_size)
        patterns = _pipeline_file_patterns(folder)
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
        class_name = class_name[-1] if isinstance(class_name, list) else class_name  # [code file, class] or class
        card = {} if subfolder else card_files(pipeline, repo_id, output_dir=output_dir, **card_kwargs)
        return upload_to_hub(
            folder,
            repo_id,
            commit_message=commit_message or f"Upload {class_name}",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            path_in_repo=subfolder,
            allow_patterns=patterns,
            extra_files=card,
        )


def main(argv: list[str] | None = None) -> CommitInfo:
    """`python -m transfusion_hf.hub OUTPUT_DIR REPO_ID [...]`: the command line of `transfusion_hf.commands.hub`."""
    # Imported when run, not at the top: the command line imports this module.
    from .commands.hub import main as command_line

    return command_line(argv)


if __name__ == "__main__":
    main()
