"""`LocalHub` driven by the real `huggingface_hub` client (and by PEFT / transformers) over HTTP.

Nothing in the client is patched; an autouse guard makes any attempt to resolve a host other than the local server
fail (and the test with it), so these tests also prove that nothing tries to reach huggingface.co.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    file_exists,
    hf_hub_download,
    model_info,
    repo_exists,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

try:  # default pytest import mode: `tests/` (no __init__.py) is on sys.path
    from hub_server import LocalHub, configure_hf_client, git_blob_sha
except ImportError:  # `tests` made a package, or --import-mode=importlib
    from tests.hub_server import LocalHub, configure_hf_client, git_blob_sha

REPO = "local-user/tiny-lora"
TOKEN = "hf_local_test_token"


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse (and remember) any name resolution other than the loopback: the client may swallow the error."""
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def guarded(host: object, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", "localhost", "::1", b"127.0.0.1"):
            attempts.append(str(host))
            raise OSError(f"test tried to reach {host!r}: only the local hub may be contacted")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


@pytest.fixture
def hub(local_hub: LocalHub) -> Iterator[LocalHub]:
    """`local_hub`, plus the check that the client called no endpoint the server does not implement."""
    yield local_hub
    assert local_hub.unhandled == []


def _write_folder(root: Path, files: dict[str, str]) -> Path:
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    return root


@pytest.mark.parametrize("upload_path", ["xet-pipeline", "create_commit"])
def test_create_repo_upload_folder_and_tag_roundtrip(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upload_path: str
) -> None:
    if upload_path == "create_commit":
        # With hf_xet installed, upload_folder goes through `_upload_pipeline`; without it, through create_commit
        # (which also validates README.md metadata through /api/validate-yaml).
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    api = HfApi()
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub.url)
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 + url in body, as on the Hub
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409

    folder = _write_folder(tmp_path / "up", {"README.md": "---\nlicense: mit\n---\n# card\n", "sub/a.txt": "A1"})
    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="round 1")
    assert len(info.oid) == 40 and info.commit_url == f"{hub.url}/{REPO}/commit/{info.oid}"
    api.create_tag(REPO, tag="round-1")
    api.create_tag(REPO, tag="round-1", exist_ok=True)

    assert hub.resolve(REPO, "round-1").sha == info.oid
    assert hub.read_file(REPO, "sub/a.txt", "round-1") == b"A1"
    refs = api.list_repo_refs(REPO)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("round-1", info.oid)]
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", info.oid)]
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["round 1", "initial commit"] and commits[0].commit_id == info.oid
    # Re-uploading identical content: preupload returns the remote oids, the client skips the empty commit.
    assert api.upload_folder(folder_path=folder, repo_id=REPO).oid == info.oid
    assert len(api.list_repo_commits(REPO)) == 2


def test_download_at_tag_survives_later_commit_on_main(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.txt", repo_id=REPO).oid
    api.create_tag(REPO, tag="round-3")
    second = api.upload_file(path_or_fileobj=b"v2", path_in_repo="weights.txt", repo_id=REPO).oid
    assert first != second

    assert Path(hf_hub_download(REPO, "weights.txt", revision="round-3")).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "weights.txt")).read_bytes() == b"v2"
    assert Path(hf_hub_download(REPO, "weights.txt", revision=first)).read_bytes() == b"v1"
    assert Path(hf_hub_download(REPO, "weights.txt", revision=first[:7])).read_bytes() == b"v1"
    # The cache is laid out by commit, as with the real Hub.
    assert f"/snapshots/{first}/" in hf_hub_download(REPO, "weights.txt", revision="round-3")
    local = hf_hub_download(REPO, "weights.txt", revision="round-3", local_dir=tmp_path / "local")
    assert Path(local).read_bytes() == b"v1"

    # HEAD then GET on /resolve; the HEAD carries what the client needs, and no Xet header.
    resolve_calls = [r for r in hub.requests if "/resolve/round-3/weights.txt" in r.path]
    assert {r.method for r in resolve_calls} == {"HEAD", "GET"}
    metadata = api.get_hf_file_metadata(url=f"{hub.url}/{REPO}/resolve/round-3/weights.txt")
    assert (metadata.commit_hash, metadata.etag, metadata.size) == (first, git_blob_sha(b"v1"), 2)
    assert metadata.xet_file_data is None


def test_snapshot_download_at_revision(hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("adapter_config.json", b"{}"),
            CommitOperationAdd("nested/deep/file.bin", b"\x00\x01"),
        ],
        commit_message="round 1",
    )
    api.create_tag(REPO, tag="v1")
    api.create_commit(
        REPO,
        operations=[CommitOperationDelete("nested/"), CommitOperationAdd("adapter_config.json", b'{"r": 8}')],
        commit_message="round 2",
    )

    snapshot = Path(snapshot_download(REPO, revision="v1"))
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "adapter_config.json",
        "nested/deep/file.bin",
    ]
    assert (snapshot / "nested/deep/file.bin").read_bytes() == b"\x00\x01"
    latest = Path(snapshot_download(REPO, allow_patterns=["*.json"]))
    assert (latest / "adapter_config.json").read_text() == '{"r": 8}'
    assert not (latest / "nested").exists()


def test_list_repo_tree_and_files(hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO)
    hub.commit(REPO, {"a.txt": "a", "dir/b.txt": "bb", "dir/sub/c.txt": "ccc"}, message="seed")

    top = {(type(e).__name__, e.path) for e in api.list_repo_tree(REPO)}
    assert top == {("RepoFile", ".gitattributes"), ("RepoFile", "a.txt"), ("RepoFolder", "dir")}
    nested = list(api.list_repo_tree(REPO, path_in_repo="dir", recursive=True, expand=True))
    assert sorted(e.path for e in nested) == ["dir/b.txt", "dir/sub", "dir/sub/c.txt"]
    b_file = next(e for e in nested if e.path == "dir/b.txt")
    assert isinstance(b_file, RepoFile) and b_file.size == 2 and b_file.blob_id == git_blob_sha(b"bb")
    assert b_file.last_commit is not None and b_file.last_commit.title == "seed"
    assert isinstance(next(e for e in nested if e.path == "dir/sub"), RepoFolder)
    assert api.list_repo_files(REPO) == [".gitattributes", "a.txt", "dir/b.txt", "dir/sub/c.txt"]
    assert [p.path for p in api.get_paths_info(REPO, ["a.txt", "dir", "missing"])] == ["a.txt", "dir"]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


def test_exists_helpers_info_and_errors(hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO)
    sha = api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO).oid
    api.create_tag(REPO, tag="v1")

    # Top-level helpers go through the module-level `HfApi` instance (what PEFT uses).
    assert repo_exists(REPO) and not repo_exists("local-user/missing")
    assert file_exists(REPO, "config.json") and file_exists(REPO, "config.json", revision="v1")
    assert not file_exists(REPO, "missing.json") and not file_exists("local-user/missing", "config.json")
    assert api.revision_exists(REPO, "v1") and not api.revision_exists(REPO, "v2")
    info = model_info(REPO, revision="v1", files_metadata=True)
    assert info.sha == sha and info.id == REPO and info.private is False
    gitattributes_size = len(hub.read_file(REPO, ".gitattributes"))
    assert {s.rfilename: s.size for s in info.siblings or []} == {
        ".gitattributes": gitattributes_size,
        "config.json": 2,
    }

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="does-not-exist")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local-user/missing", "config.json")

    api.create_branch(REPO, branch="dev", revision="v1")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["dev", "main"]
    assert file_exists(REPO, "dev.txt", revision="dev") and not file_exists(REPO, "dev.txt")
    api.delete_branch(REPO, branch="dev")

    api.delete_tag(REPO, tag="v1")
    assert api.list_repo_refs(REPO).tags == []
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(REPO, tag="v1")
    api.delete_file("config.json", repo_id=REPO)
    assert api.list_repo_files(REPO) == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as stale:  # parent_commit no longer the head of main
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO, parent_commit=sha)
    assert stale.value.response.status_code == 412
    api.delete_repo(REPO)
    assert not repo_exists(REPO)


def test_dataset_repo_and_canonical_repo_id(hub: LocalHub) -> None:
    api = HfApi()
    api.create_repo("local-user/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n", path_in_repo="train.csv", repo_id="local-user/data", repo_type="dataset")
    assert Path(hf_hub_download("local-user/data", "train.csv", repo_type="dataset")).read_bytes() == b"a,b\n"
    assert api.list_repo_files("local-user/data", repo_type="dataset") == [".gitattributes", "train.csv"]
    assert not repo_exists("local-user/data")  # it is a dataset, not a model

    hub.create_repo("gpt2")  # legacy id without namespace, seeded from Python
    hub.commit("gpt2", {"config.json": "{}"})
    assert Path(hf_hub_download("gpt2", "config.json")).read_text() == "{}"
    assert api.model_info("gpt2").sha == hub.resolve("gpt2").sha


def test_token_is_required_and_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalHub(token=TOKEN) as hub:
        configure_hf_client(monkeypatch, hub.url, tmp_path / "hf_home")
        api = HfApi()

        with pytest.raises(HfHubHTTPError) as anonymous:
            api.create_repo(REPO, private=True)
        assert anonymous.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as wrong:
            api.create_repo(REPO, private=True, token="hf_wrong")
        assert wrong.value.response.status_code == 401
        assert hub.requests[-1].authorization == "Bearer hf_wrong"

        monkeypatch.setenv("HF_TOKEN", TOKEN)
        api.create_repo(REPO, private=True)
        api.upload_file(path_or_fileobj=b"secret", path_in_repo="w.bin", repo_id=REPO)
        assert api.whoami()["name"] == "local-user"
        assert Path(hf_hub_download(REPO, "w.bin")).read_bytes() == b"secret"
        assert repo_exists(REPO)
        assert hub.requests[-1].authorization == f"Bearer {TOKEN}"
        writes = [r for r in hub.requests if r.method in ("POST", "DELETE")]
        assert {r.authorization for r in writes} == {None, "Bearer hf_wrong", f"Bearer {TOKEN}"}
        assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if "/resolve/" in r.path)

        # Without the token, the private repo looks missing (401 + RepoNotFound), as on the Hub. (A fresh cache:
        # when the HEAD call fails, hf_hub_download falls back to an already cached copy of the file.)
        monkeypatch.delenv("HF_TOKEN")
        assert not repo_exists(REPO)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(REPO, "w.bin", cache_dir=tmp_path / "anonymous-cache")
        assert hub.unhandled == []


# ---------------------------------------------------------------------------- PEFT / transformers


def _tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64))


def test_peft_adapter_loads_from_tag(hub: LocalHub, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(_tiny_gpt2(), LoraConfig(r=4, target_modules=["c_fc"], fan_in_fan_out=True))
    with torch.no_grad():  # LoRA B starts at zero: make both rounds distinguishable
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_()
    api = HfApi()
    api.create_repo(REPO)
    round_weights = []
    for round_idx in (1, 2):
        if round_idx == 2:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_" in name:
                        param.add_(1.0)
        model.save_pretrained(tmp_path / f"round-{round_idx}")
        api.upload_folder(folder_path=tmp_path / f"round-{round_idx}", repo_id=REPO)
        api.create_tag(REPO, tag=f"round-{round_idx}")
        round_weights.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})

    assert "adapter_model.safetensors" in api.list_repo_files(REPO, revision="round-1")
    for revision, expected in (("round-1", round_weights[0]), ("round-2", round_weights[1]), (None, round_weights[1])):
        loaded = PeftModel.from_pretrained(_tiny_gpt2(), REPO, revision=revision)
        got = get_peft_model_state_dict(loaded)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), revision


def test_transformers_from_pretrained_at_tag(hub: LocalHub, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny_gpt2()
    api = HfApi()
    api.create_repo(REPO)
    model.save_pretrained(tmp_path / "v1")
    api.upload_folder(folder_path=tmp_path / "v1", repo_id=REPO)
    api.create_tag(REPO, tag="v1")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    model.save_pretrained(tmp_path / "v2")
    api.upload_folder(folder_path=tmp_path / "v2", repo_id=REPO)

    loaded = AutoModelForCausalLM.from_pretrained(REPO, revision="v1")
    assert torch.equal(loaded.transformer.wte.weight, expected["transformer.wte.weight"])
    assert not torch.equal(
        AutoModelForCausalLM.from_pretrained(REPO).transformer.wte.weight, loaded.transformer.wte.weight
    )
