"""Tests of the LocalHub fake Hub server, driven by the real (unmodified) ``huggingface_hub`` client."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import hub_fixtures
from hub_server import DEFAULT_USER, LocalHub

# Make the fixture available even without a conftest.py importing it (tests/ is on sys.path under pytest's default
# "prepend" import mode). An assignment, not an import, so test parameters named `local_hub` don't trip F811.
local_hub = hub_fixtures.local_hub

REPO = f"{DEFAULT_USER}/test-repo"


@pytest.fixture(autouse=True)
def _no_unhandled_requests(local_hub: LocalHub) -> Iterator[None]:
    """Every flow below must stay inside the implemented API subset and never crash a handler."""
    yield
    assert local_hub.unhandled_requests == []
    assert local_hub.server_errors == []


@pytest.fixture
def api(local_hub: LocalHub) -> HfApi:
    """An ``HfApi`` built after the fixture patched ``constants.ENDPOINT`` (so it targets the local hub)."""
    return HfApi()


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_fixture_points_client_at_local_hub(local_hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    assert constants.ENDPOINT == local_hub.endpoint == os.environ["HF_ENDPOINT"]
    assert api.endpoint == local_hub.endpoint
    assert constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
    assert not constants.is_offline_mode()
    assert api.whoami()["name"] == DEFAULT_USER


def test_create_repo_and_exist_ok(local_hub: LocalHub, api: HfApi) -> None:
    url = api.create_repo("test-repo")  # no namespace -> the token's user
    assert url.repo_id == REPO
    assert url.endpoint == local_hub.endpoint
    assert str(url) == f"{local_hub.endpoint}/{REPO}"

    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_repo(REPO)
    assert exc_info.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO

    # A fresh repo has the Hub's initial commit with a .gitattributes, and other namespaces / repo types work.
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert api.create_repo("some-org/data", repo_type="dataset").repo_type == "dataset"
    assert api.repo_exists("some-org/data", repo_type="dataset")
    assert not api.repo_exists("some-org/data")

    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)


def test_upload_file_and_hf_hub_download(local_hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    payload = os.urandom(100_000)
    info = api.upload_file(path_or_fileobj=payload, path_in_repo="weights/blob.bin", repo_id=REPO)
    assert info.oid == api.model_info(REPO).sha

    path = hf_hub_download(REPO, "weights/blob.bin")
    assert Path(path).read_bytes() == payload
    assert info.oid in path  # cached under snapshots/<commit sha>/
    assert api.file_exists(REPO, "weights/blob.bin")
    assert not api.file_exists(REPO, "weights/other.bin")
    assert api.get_paths_info(REPO, ["weights/blob.bin"])[0].size == len(payload)


def test_upload_folder_and_snapshot_download(local_hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    files = {
        "config.json": json.dumps({"a": 1}).encode(),
        "sub/dir/weights.safetensors": os.urandom(5000),
        "sub/notes with space.txt": b"hello\n",
    }
    _write_tree(tmp_path / "folder", files)
    api.create_repo(REPO)
    api.upload_folder(folder_path=tmp_path / "folder", repo_id=REPO)

    assert api.list_repo_files(REPO) == [".gitattributes", *sorted(files)]
    snapshot = Path(snapshot_download(REPO))
    for rel, data in files.items():
        assert (snapshot / rel).read_bytes() == data

    only_json = Path(snapshot_download(REPO, allow_patterns=["*.json"], local_dir=tmp_path / "only_json"))
    downloaded = [p.relative_to(only_json) for p in only_json.rglob("*") if p.is_file()]
    assert [str(p) for p in downloaded if p.parts[0] != ".cache"] == ["config.json"]  # .cache: client metadata


def test_list_repo_files_paginates_and_tree_lists_folders(local_hub: LocalHub, api: HfApi) -> None:
    local_hub.commit_files(REPO, {f"d/f{i}.txt": str(i).encode() for i in range(5)} | {"top.txt": b"t"})
    local_hub.page_size = 2  # force the Link-header pagination the client follows
    assert api.list_repo_files(REPO) == [".gitattributes", *(f"d/f{i}.txt" for i in range(5)), "top.txt"]
    assert any("cursor=" in path for _, path, _ in local_hub.request_log)

    top_level = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO)}
    assert top_level == {("RepoFile", ".gitattributes"), ("RepoFolder", "d"), ("RepoFile", "top.txt")}
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="d")][:2] == ["d/f0.txt", "d/f1.txt"]


def test_branch_push_and_load_by_revision(local_hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    main_info = api.upload_file(path_or_fileobj=b"v1", path_in_repo="file.txt", repo_id=REPO)

    # Like the real Hub, committing to a branch that does not exist yet is a RevisionNotFound.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"v2", path_in_repo="file.txt", repo_id=REPO, revision="dev")
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    dev_info = api.upload_file(path_or_fileobj=b"v2", path_in_repo="file.txt", repo_id=REPO, revision="dev")

    assert Path(hf_hub_download(REPO, "file.txt", revision="dev")).read_bytes() == b"v2"
    assert Path(hf_hub_download(REPO, "file.txt")).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "file.txt", revision=main_info.oid)).read_bytes() == b"v1"
    assert Path(snapshot_download(REPO, revision="dev")).joinpath("file.txt").read_bytes() == b"v2"

    api.create_tag(REPO, tag="v1.0", revision=main_info.oid)
    assert Path(hf_hub_download(REPO, "file.txt", revision="v1.0")).read_bytes() == b"v1"
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main_info.oid, "dev": dev_info.oid}
    assert [t.name for t in refs.tags] == ["v1.0"]
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="dev")][:2] == [dev_info.oid, main_info.oid]


def test_create_pr_gives_loadable_pr_ref(local_hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    info = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id=REPO, create_pr=True)
    assert info.pr_revision == "refs/pr/1"
    assert info.pr_url == f"{local_hub.endpoint}/{REPO}/discussions/1"

    assert Path(hf_hub_download(REPO, "pr.txt", revision=info.pr_revision)).read_bytes() == b"proposal"
    assert api.model_info(REPO, revision=info.pr_revision).sha == info.oid
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "pr.txt")  # not on main until merged

    # Push a second commit to the same PR, then merge it.
    api.upload_file(path_or_fileobj=b"more", path_in_repo="pr2.txt", repo_id=REPO, revision=info.pr_revision)
    api.merge_pull_request(REPO, 1)
    assert api.list_repo_files(REPO) == [".gitattributes", "pr.txt", "pr2.txt"]


def test_missing_repo_raises_repository_not_found(local_hub: LocalHub, api: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{DEFAULT_USER}/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{DEFAULT_USER}/does-not-exist")


def test_missing_revision_raises_revision_not_found(local_hub: LocalHub, api: HfApi) -> None:
    local_hub.commit_files(REPO, {"config.json": b"{}"})
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="refs/pr/42")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="0" * 40)


def test_missing_file_raises_entry_not_found(local_hub: LocalHub, api: HfApi) -> None:
    local_hub.commit_files(REPO, {"config.json": b"{}"})
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.json", repo_id=REPO)


def test_private_repo_and_auth(local_hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=REPO)
    assert api.model_info(REPO).private
    assert Path(hf_hub_download(REPO, "s.txt")).read_bytes() == b"secret"
    # Without a token a private repo looks missing (separate cache: the client would fall back to cached files).
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "s.txt", token=False, cache_dir=tmp_path / "anonymous")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO, token=False)
    with pytest.raises(HfHubHTTPError):
        api.create_repo("other", token="hf_wrong_token")


def test_commit_history_delete_and_parent_commit(local_hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=REPO)
    # Re-uploading identical content is skipped client-side thanks to the preupload `oid`: no new commit.
    assert api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=REPO).oid == first.oid
    second = api.delete_file("a.txt", repo_id=REPO, commit_message="remove a")
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits(REPO)] == [
        "remove a",
        "Upload a.txt with huggingface_hub",
        "initial commit",
    ]
    with pytest.raises(HfHubHTTPError) as exc_info:  # stale parent_commit -> 412, as on the Hub
        api.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=REPO, parent_commit=first.oid)
    assert exc_info.value.response.status_code == 412
    api.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=REPO, parent_commit=second.oid)


def test_download_in_fresh_subprocess(local_hub: LocalHub, api: HfApi, tmp_path: Path) -> None:
    api.create_repo(REPO)
    payload = os.urandom(2048)
    api.upload_file(path_or_fileobj=payload, path_in_repo="data.bin", repo_id=REPO)

    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from huggingface_hub import HfApi, constants, hf_hub_download

        assert constants.ENDPOINT == os.environ["HF_ENDPOINT"], constants.ENDPOINT
        path = hf_hub_download({REPO!r}, "data.bin")
        print(path)
        print(Path(path).read_bytes().hex())
        HfApi().upload_file(path_or_fileobj=b"from child", path_in_repo="child.txt", repo_id={REPO!r})
        """
    )
    result = local_hub.run_python(code, timeout=120)
    child_path, child_hex = result.stdout.split()[-2:]
    assert bytes.fromhex(child_hex) == payload
    assert Path(child_path).is_relative_to(tmp_path / "hf_home" / "hub")  # the child used the test's HF_HOME
    assert local_hub.read_file(REPO, "child.txt") == b"from child"


def test_modelcard_push_to_hub(local_hub: LocalHub, api: HfApi) -> None:
    api.create_repo(REPO)
    card = ModelCard("---\nlicense: mit\ntags:\n- test\n---\n\n# Tiny model\n")
    card.push_to_hub(REPO)
    loaded = ModelCard.load(REPO)
    assert loaded.data.license == "mit"
    assert loaded.text.strip() == "# Tiny model"


def test_transformers_push_to_hub_and_from_pretrained(local_hub: LocalHub) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.push_to_hub("tiny-llama")  # no namespace: create_repo puts it under the token's user
    repo_id = f"{local_hub.user}/tiny-llama"
    assert {"config.json", "model.safetensors"} <= set(local_hub.list_files(repo_id))

    loaded = transformers.LlamaForCausalLM.from_pretrained(repo_id)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)

    # Push different weights to a branch (transformers creates it) and load each revision back.
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(config)
    other.push_to_hub(repo_id, revision="exp", commit_message="exp push")
    from_branch = transformers.LlamaForCausalLM.from_pretrained(repo_id, revision="exp").state_dict()
    from_main = transformers.LlamaForCausalLM.from_pretrained(repo_id).state_dict()
    assert all(torch.equal(other.state_dict()[name], from_branch[name]) for name in expected)
    assert all(torch.equal(expected[name], from_main[name]) for name in expected)


@pytest.mark.slow
def test_diffusers_pipeline_push_and_load(local_hub: LocalHub) -> None:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")

    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    pipe.push_to_hub("tiny-ddpm")
    loaded = diffusers.DDPMPipeline.from_pretrained(f"{local_hub.user}/tiny-ddpm")
    expected, actual = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
