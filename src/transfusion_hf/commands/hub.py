"""Push a saved TransfusionPipeline (a training output folder) and its model card to the Hub from the command line::

    python -m transfusion_hf.hub outputs/shapes your-name/transfusion-shapes [--private] [--revision v2] [--create_pr]

`python -m transfusion_hf.commands.hub` is the same command.
"""

from __future__ import annotations

import argparse

from huggingface_hub import CommitInfo

from ..hub import push_pipeline_to_hub
from ..modelcard_transfusion import DEFAULT_LICENSE


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m transfusion_hf.hub`."""
    parser = argparse.ArgumentParser(
        prog="python -m transfusion_hf.hub",
        description="Push a saved TransfusionPipeline (a training --output_dir) and its model card to the Hub.",
    )
    parser.add_argument("output_dir", help="Folder written by save_pretrained / examples/train_transfusion.py.")
    parser.add_argument("repo_id", help="`name` (in your namespace) or `namespace/name`.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (if it does not exist).")
    parser.add_argument("--revision", default=None, help="Branch to push to (created from main if new).")
    parser.add_argument("--create_pr", action="store_true", help="Open a pull request instead of committing.")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="Default: the token of `hf auth login` / $HF_TOKEN.")
    parser.add_argument("--license", default=DEFAULT_LICENSE)
    parser.add_argument("--base_model", default=None, help="Hub id of the LLM the backbone started from.")
    parser.add_argument("--dataset", dest="datasets", action="append", default=None, help="Hub data set id.")
    return parser


def main(argv: list[str] | None = None) -> CommitInfo:
    """Parse `argv` (default: the command line), push the folder with `push_pipeline_to_hub`, print the commit URL
    (or the pull request's) and return the commit.

    Args:
        argv (`list[str]`, *optional*): the arguments, without the program name.
    """
    args = build_parser().parse_args(argv)
    info = push_pipeline_to_hub(
        args.output_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        token=args.token,
        license=args.license,
        base_model=args.base_model,
        datasets=args.datasets,
    )
    print(info.pr_url or info.commit_url)
    return info


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    main()
