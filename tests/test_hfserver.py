"""The Hub stand-in (tests/hfserver.py) driven by the real huggingface_hub client.

These keep the stand-in honest: every call goes through ``HfApi(endpoint=hub.url)`` in-process
(and once through ``HF_ENDPOINT`` in a fresh process), so a stand-in that drifts from what the
client sends or expects fails here. Uploads run both ways the client can send files the Hub
stores with LFS: Xet (the default while hf_xet is installed) and git-lfs (``HF_HUB_DISABLE_XET``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from hfserver import HubServer

WRITE, READ, BAD = "hf_write_alice", "hf_read_alice", "hf_not_a_token"
BIG = 2 * 1024 * 1024  # a .safetensors of random bytes: LFS by the Hub's .gitattributes, and binary anyway


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The suite runs with HF_HUB_OFFLINE=1 (read at import): let this client reach the loopback Hub.
    hf_xet's shard cache goes to a temporary folder instead of ~/.cache."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_token(WRITE, user="alice", role="write", orgs=["acme"])
        server.add_token(READ, user="alice", role="read", orgs=["acme"])
        yield server


@pytest.fixture(params=["xet", "lfs"])
def transfer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the client sends LFS files: Xet (its default with hf_xet installed) or git-lfs."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "lfs")
    return request.param


def api(hub: HubServer, token: str | bool) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def model_folder(root: Path) -> tuple[Path, dict[str, bytes]]:
    """A small text file, a model card with metadata and a larger binary file."""
    folder = root / "out"
    folder.mkdir()
    files = {
        "notes.txt": b"trained for 6 steps\n",
        "README.md": b"---\nlicense: mit\ntags:\n- lora\n---\n# my LoRA\n",
        "adapter.safetensors": os.urandom(BIG),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder, files


def status_of(exc: BaseException) -> int:
    return exc.response.status_code  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- accounts


def test_whoami_returns_the_user_orgs_and_the_token_role(hub: HubServer) -> None:
    me = api(hub, WRITE).whoami()
    assert me["name"] == "alice"
    assert [org["name"] for org in me["orgs"]] == ["acme"]
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api(hub, READ).whoami()["auth"]["accessToken"]["role"] == "read"
    assert ("GET", "/api/whoami-v2") in hub.requests


def test_an_unknown_token_gets_401(hub: HubServer) -> None:
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as info:
        api(hub, BAD).whoami()
    assert status_of(info.value) == 401
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as info:
        api(hub, BAD).create_repo("alice/lora")
    assert status_of(info.value) == 401
    assert not hub.repo_exists("alice/lora")


# ----------------------------------------------------------------------------- repos


def test_create_repo_in_the_user_and_an_org_namespace(hub: HubServer) -> None:
    client = api(hub, WRITE)
    url = client.create_repo("alice/lora", private=True)
    assert url == f"{hub.url}/alice/lora" and url.repo_id == "alice/lora"
    client.create_repo("acme/shared-lora")
    assert hub.repo_exists("alice/lora") and hub.is_private("alice/lora")
    assert hub.repo_exists("acme/shared-lora") and not hub.is_private("acme/shared-lora")
    info = client.model_info("alice/lora")
    assert info.id == "alice/lora" and info.private is True and info.sha == hub.commits("alice/lora")[-1].oid
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]  # the Hub's initial commit
    assert b"*.safetensors filter=lfs" in hub.files("alice/lora")[".gitattributes"]


@pytest.mark.parametrize(
    ("token", "repo_id", "words"),
    [(READ, "alice/lora", "read access"), (WRITE, "bob/lora", 'namespace "bob"')],
    ids=["read-token", "foreign-namespace"],
)
def test_create_repo_is_refused_with_403(hub: HubServer, token: str, repo_id: str, words: str) -> None:
    with pytest.raises(HfHubHTTPError, match=words) as info:
        api(hub, token).create_repo(repo_id)
    assert status_of(info.value) == 403
    assert not hub.repo_exists(repo_id)


def test_create_repo_twice(hub: HubServer) -> None:
    client = api(hub, WRITE)
    first = client.create_repo("alice/lora", exist_ok=True)
    assert client.create_repo("alice/lora", exist_ok=True) == first
    with pytest.raises(HfHubHTTPError, match="already created") as info:
        client.create_repo("alice/lora")
    assert status_of(info.value) == 409
    assert len(hub.commits("alice/lora")) == 1


def test_missing_and_foreign_private_repos_are_not_found(hub: HubServer) -> None:
    hub.add_repo("bob/secret", private=True)
    hub.add_repo("bob/public")
    with pytest.raises(RepositoryNotFoundError) as info:
        api(hub, WRITE).repo_info("alice/missing")
    assert status_of(info.value) == 404
    with pytest.raises(RepositoryNotFoundError):
        api(hub, WRITE).repo_info("bob/secret")
    with pytest.raises(RepositoryNotFoundError) as info:
        api(hub, False).repo_info("bob/secret")
    assert status_of(info.value) == 401  # anonymous callers get 401, as on the Hub
    assert api(hub, False).repo_info("bob/public").id == "bob/public"


# ----------------------------------------------------------------------------- uploads


def test_upload_folder_lands_every_file_byte_for_byte(hub: HubServer, transfer: str, tmp_path: Path) -> None:
    folder, files = model_folder(tmp_path)
    client = api(hub, WRITE)
    client.create_repo("alice/lora", private=True)
    commit = client.upload_folder(repo_id="alice/lora", folder_path=folder, commit_message="Upload LoRA")

    stored = hub.files("alice/lora")
    assert {name: stored[name] for name in files} == files
    assert hub.lfs_files("alice/lora") == {"adapter.safetensors"}
    assert commit.oid == hub.commits("alice/lora")[-1].oid
    assert hub.commits("alice/lora")[-1].summary == "Upload LoRA"
    siblings = {s.rfilename: s for s in client.model_info("alice/lora", files_metadata=True).siblings or []}
    lfs = siblings["adapter.safetensors"].lfs
    assert lfs is not None and lfs.size == BIG

    paths = [path for _, path in hub.requests]
    assert "/api/models/alice/lora/preupload/main" in paths and "/api/models/alice/lora/commit/main" in paths
    if transfer == "xet":
        assert "/api/models/alice/lora/xet-write-token/main" in paths
        assert any("/v1/xorbs/default/" in p for p in paths) and any(p.endswith("/shards") for p in paths)
    else:
        assert "/alice/lora.git/info/lfs/objects/batch" in paths
        assert any(method == "PUT" and path.startswith("/__storage/") for method, path in hub.requests)


def test_hf_hub_download_reads_what_was_uploaded_under_the_hubs_access_rules(
    hub: HubServer, tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    folder, files = model_folder(tmp_path)
    client = api(hub, WRITE)
    client.create_repo("alice/private", private=True)
    commit = client.upload_folder(repo_id="alice/private", folder_path=folder)

    def get(name: str, token: str | bool, rev: str | None = None) -> bytes:
        got = hf_hub_download(
            "alice/private", name, revision=rev, token=token, endpoint=hub.url, local_dir=tmp_path / "dl"
        )
        return Path(got).read_bytes()

    assert get("adapter.safetensors", WRITE, commit.oid) == files["adapter.safetensors"]
    with pytest.raises(RepositoryNotFoundError):  # private: anonymous callers do not see it
        get("notes.txt", False)
    with pytest.raises(EntryNotFoundError):
        get("missing.txt", WRITE)
    client.create_repo("alice/public", private=False)
    client.upload_folder(repo_id="alice/public", folder_path=folder)
    assert hf_hub_download(
        "alice/public", "notes.txt", token=False, endpoint=hub.url, cache_dir=tmp_path / "c"
    )
    assert ("HEAD", "/alice/public/resolve/main/notes.txt") in hub.requests


def test_a_model_card_is_validated(hub: HubServer, tmp_path: Path) -> None:
    client = api(hub, WRITE)
    client.create_repo("alice/lora")
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        client.upload_folder(repo_id="alice/lora", folder_path=tmp_path)
    (tmp_path / "README.md").write_text("# no metadata\n")
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):
        client.upload_folder(repo_id="alice/lora", folder_path=tmp_path)
    assert hub.files("alice/lora")["README.md"] == b"# no metadata\n"


def test_uploads_need_a_write_token(hub: HubServer, transfer: str, tmp_path: Path) -> None:
    folder, _ = model_folder(tmp_path)
    api(hub, WRITE).create_repo("alice/lora")
    with pytest.raises(HfHubHTTPError, match="read access") as info:
        api(hub, READ).upload_folder(repo_id="alice/lora", folder_path=folder)
    assert status_of(info.value) == 403
    assert set(hub.files("alice/lora")) == {".gitattributes"}


@pytest.mark.parametrize("point", ["preupload", "commit"])
def test_refused_uploads_fail_after_the_credentials_checked_out(
    hub: HubServer, transfer: str, point: str, tmp_path: Path
) -> None:
    folder, _ = model_folder(tmp_path)
    client = api(hub, WRITE)
    hub.refuse_uploads, hub.refusal_point = True, point
    assert client.whoami()["auth"]["accessToken"]["role"] == "write"
    client.create_repo("alice/lora", private=True, exist_ok=True)
    assert client.repo_info("alice/lora").private is True
    with pytest.raises(HfHubHTTPError, match="refuse_uploads") as info:
        client.upload_folder(repo_id="alice/lora", folder_path=folder)
    assert status_of(info.value) == 403
    assert set(hub.files("alice/lora")) == {".gitattributes"}
    assert len(hub.commits("alice/lora")) == 1

    hub.refuse_uploads = False
    client.upload_folder(repo_id="alice/lora", folder_path=folder)
    assert "adapter.safetensors" in hub.files("alice/lora")


def test_a_storage_refusal_under_xet_surfaces_as_a_connection_error(hub: HubServer, tmp_path: Path) -> None:
    """hf_xet reports HTTP errors of its own calls (Xet token, CAS) as a builtin ConnectionError
    naming the status, not as an HfHubHTTPError."""
    folder, _ = model_folder(tmp_path)
    client = api(hub, WRITE)
    client.create_repo("alice/lora")
    hub.refuse_uploads, hub.refusal_point = True, "storage"
    with pytest.raises(ConnectionError, match="403") as info:
        client.upload_folder(repo_id="alice/lora", folder_path=folder)
    assert not isinstance(info.value, HfHubHTTPError)
    assert "xet-write-token" in str(info.value)


# ----------------------------------------------------------------------------- plumbing


def test_hf_endpoint_reaches_the_stand_in_from_a_fresh_process(hub: HubServer, tmp_path: Path) -> None:
    script = (
        "import json\n"
        "from huggingface_hub import HfApi, constants\n"
        f"api = HfApi(token={WRITE!r})\n"
        "url = api.create_repo('alice/from-env', exist_ok=True)\n"
        "print(json.dumps({'endpoint': constants.ENDPOINT, 'user': api.whoami()['name'], 'url': str(url)}))\n"
    )
    env = {**os.environ, **hub.client_env(), "HF_XET_CACHE": str(tmp_path / "xet-cache")}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"endpoint": hub.url, "user": "alice", "url": f"{hub.url}/alice/from-env"}
    assert hub.repo_exists("alice/from-env")


def test_requests_are_recorded_with_status_and_user(hub: HubServer) -> None:
    api(hub, WRITE).whoami()
    with pytest.raises(HfHubHTTPError):
        api(hub, BAD).whoami()
    assert [(r.method, r.path, r.status, r.user) for r in hub.log] == [
        ("GET", "/api/whoami-v2", 200, "alice"),
        ("GET", "/api/whoami-v2", 401, None),
    ]


def test_a_stopped_hub_answers_nothing(hub: HubServer) -> None:
    client = api(hub, WRITE)
    client.whoami()  # leaves a kept-alive connection in the client's pool
    hub.stop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:  # noqa: B017 - the transport's own error classes
            client.whoami()
    assert not isinstance(info.value, HfHubHTTPError)
