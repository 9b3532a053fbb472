"""TEST-ONLY fake of the Hugging Face Hub *upload* API, backed by plain git repositories on disk.

Not a Hub: no accounts (one optional fixed bearer token), no Xet, no pull requests, commits to existing branches
only. It lets tests push with the real ``huggingface_hub`` client (``HfApi.create_repo`` + ``upload_folder`` with
``HF_HUB_DISABLE_XET=1``) and read the result back through a real mirror (olah's ``mirrors-path``), all on 127.0.0.1.

Protocol steps, in the client's order (shapes from huggingface_hub 2.x ``hf_api``, ``_commit_api``, ``lfs``):

  POST /api/repos/create                        git init <mirrors>/<type>s/<org>/<name>: branch main, empty commit
  POST /api/validate-yaml                       sent along with a README.md: always valid
  GET  /api/<type>s/<repo>[/revision/<rev>]      minimal repo info (id, sha, siblings)
  POST /api/<type>s/<repo>/preupload/<rev>      uploadMode "lfs" for *.safetensors, *.bin, > 10 MB; else "regular"
  POST /[<type>s/]<repo>.git/info/lfs/objects/batch    git-lfs batch API, basic transfer: upload + verify actions
  PUT  /lfs-objects/<oid>                        the object's bytes (sha256 checked)
  POST /lfs-objects/<oid>/verify                 200 once stored with the announced size
  POST /api/<type>s/<repo>/commit/<rev>         ndjson: header, file (base64), lfsFile (oid), deletedFile/Folder

A commit writes the *real bytes* of every file (LFS ones included) into the working tree and runs
``git add -A`` + ``git commit``: olah serves a mirror straight from git objects, so no LFS pointers are needed.
Errors carry ``X-Error-Code`` / ``X-Error-Message`` as on the Hub, so the client raises its usual exceptions.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")
LFS_MIN_SIZE = 10 * 1024 * 1024
_TYPE = r"(?P<type>models|datasets|spaces)"
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [  # (method, regex on the URL path, handler name); first full match wins
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", rf"/api/{_TYPE}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("POST", r"/lfs-objects/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
]
_GIT_ENV = {  # hermetic git: no user/system config, fixed identity
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "hub-test", "GIT_AUTHOR_EMAIL": "hub-test@127.0.0.1",
    "GIT_COMMITTER_NAME": "hub-test", "GIT_COMMITTER_EMAIL": "hub-test@127.0.0.1",
}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def git(repo_dir: str | Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=repo_dir, env={**os.environ, **_GIT_ENV}, capture_output=True, text=True)
    if r.returncode != 0:
        raise HubError(500, f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _safe_path(path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or p.parts[0] == ".git":
        raise HubError(400, f"invalid path in repo: {path!r}")
    return p


class HubUploadServer:
    """``with HubUploadServer(mirrors_dir, token="t") as hub: ...`` serves on ``hub.url`` (a free 127.0.0.1 port).

    ``requests`` records ``(method, path)`` of every request; ``commits`` records each commit's repo, oid,
    regular and LFS paths, so tests can check which protocol steps really ran.
    """

    def __init__(self, mirrors_dir: str | Path, *, token: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.mirrors_dir, self.token = Path(mirrors_dir), token
        self.lfs_dir = Path(tempfile.mkdtemp(prefix="hub-lfs-"))  # uploaded LFS objects, by sha256, until committed
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.hub = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        return "http://%s:%d" % self.httpd.server_address[:2]

    def start(self) -> "HubUploadServer":
        threading.Thread(target=self.httpd.serve_forever, name="hub-upload-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        shutil.rmtree(self.lfs_dir, ignore_errors=True)

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.mirrors_dir / repo_type / repo_id  # olah's layout: <mirrors>/<type>s/<org>/<name>


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every response carries a Content-Length

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _dispatch(self) -> None:
        hub: HubUploadServer = self.server.hub  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        hub.requests.append((self.command, path))
        try:
            body = self._read_body()  # always drain the body first, so keep-alive stays in sync
            if "create_pr=" in urlsplit(self.path).query:
                raise HubError(400, "create_pr is not supported by this test server")
            for method, pattern, name in _ROUTES:
                m = re.fullmatch(pattern, path)
                if m and method == self.command:
                    if name not in ("lfs_put", "lfs_verify"):  # those are pre-signed URLs on the real Hub
                        self._check_token(hub)
                    params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    params.setdefault("type", "models")
                    status, payload = getattr(self, f"_h_{name}")(hub, body, **params)
                    return self._send(status, payload)
            raise HubError(404, f"no such endpoint: {self.command} {path}")
        except Exception as e:  # a clean JSON error, never a dropped connection
            e = e if isinstance(e, HubError) else HubError(500, f"{type(e).__name__}: {e}")
            headers = {"X-Error-Message": e.message, "X-Error-Code": e.code}
            self._send(e.status, {"error": e.message, **e.extra}, headers)

    do_GET = do_POST = do_PUT = _dispatch

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):  # huggingface_hub always sends a Content-Length
            self.close_connection = True
            raise HubError(411, "this test server needs a Content-Length (no chunked bodies)")
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": len(data), **(headers or {})}.items():
            if v is not None:
                self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)

    def _check_token(self, hub: HubUploadServer) -> None:
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header", "Unauthorized")

    def _base(self) -> str:  # the client's own endpoint: it parses repo ids out of the URLs it gets back
        return f"http://{self.headers.get('Host')}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self._base()}/{'' if repo_type == 'models' else repo_type + '/'}{repo_id}"

    def _existing_repo(self, hub: HubUploadServer, repo_type: str, repo_id: str) -> Path:
        d = hub.repo_dir(repo_type, repo_id)
        if not (d / ".git").is_dir():
            raise HubError(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return d

    @staticmethod
    def _branch_head(repo: Path, rev: str) -> str:
        try:
            return git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{rev}^{{commit}}")
        except HubError:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound") from None

    # ---- endpoints: each returns (status, json payload)
    def _h_create_repo(self, hub, body, type):
        req = json.loads(body or b"{}")
        repo_type = (req.get("type") or "model") + "s"
        repo_id = str(_safe_path("/".join(p for p in (req.get("organization"), req.get("name")) if p)))
        url, d = self._repo_url(repo_type, repo_id), hub.repo_dir(repo_type, repo_id)
        with hub.lock:
            if d.exists():
                raise HubError(409, f"You already created this {repo_type[:-1]} repo", url=url)  # client reads url
            d.mkdir(parents=True)
            git(d, "init", "-q")
            git(d, "symbolic-ref", "HEAD", "refs/heads/main")
            git(d, "commit", "-q", "--allow-empty", "-m", "initial commit")
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _h_validate_yaml(self, hub, body, type):
        return 200, {"errors": [], "warnings": []}

    def _h_repo_info(self, hub, body, type, repo, rev="main"):
        d = self._existing_repo(hub, type, repo)
        sha = self._branch_head(d, rev)
        when = datetime.fromtimestamp(int(git(d, "log", "-1", "--format=%ct", sha)), timezone.utc)
        date = when.strftime("%Y-%m-%dT%H:%M:%S.000Z")  # the only format huggingface_hub parses
        return 200, {"id": repo, "sha": sha, "private": False, "tags": [], "lastModified": date,
                     "siblings": [{"rfilename": f} for f in git(d, "ls-tree", "-r", "--name-only", sha).splitlines()]}

    def _h_preupload(self, hub, body, type, repo, rev):
        self._branch_head(self._existing_repo(hub, type, repo), rev)
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or int(f["size"]) > LFS_MIN_SIZE
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": files}

    def _h_lfs_batch(self, hub, body, type, repo):
        self._existing_repo(hub, type, repo)
        if (req := json.loads(body)).get("operation") != "upload":
            raise HubError(400, "only the 'upload' operation is supported")
        objects = []
        for o in req["objects"]:
            stored = hub.lfs_dir / o["oid"]
            obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if not (stored.is_file() and stored.stat().st_size == o["size"]):  # already there: no actions
                href = f"{self._base()}/lfs-objects/{o['oid']}"
                obj["actions"] = {"upload": {"href": href, "header": {}}, "verify": {"href": f"{href}/verify"}}
            objects.append(obj)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _h_lfs_put(self, hub, body, type, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded bytes do not hash to {oid}")
        (hub.lfs_dir / oid).write_bytes(body)
        return 200, None

    def _h_lfs_verify(self, hub, body, type, oid):
        stored, size = hub.lfs_dir / oid, json.loads(body).get("size")
        if not stored.is_file() or (size is not None and stored.stat().st_size != size):
            raise HubError(404, f"LFS object {oid} was not uploaded", "EntryNotFound")
        return 200, {"success": True}

    def _h_commit(self, hub, body, type, repo, rev):
        d = self._existing_repo(hub, type, repo)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a 'header' line")
        header, ops, record = lines[0]["value"], [], {"repo": repo, "files": [], "lfs_files": [], "deleted": []}
        for line in lines[1:]:  # validate everything, resolve LFS oids, before touching the repo
            key, v = line["key"], line["value"]
            path = _safe_path(v["path"].strip("/"))
            if key == "file":
                ops.append((path, base64.b64decode(v["content"])))
                record["files"].append(str(path))
            elif key == "lfsFile":
                src = hub.lfs_dir / v["oid"]
                if not src.is_file() or ("size" in v and src.stat().st_size != v["size"]):
                    raise HubError(400, f"LFS object {v['oid']} for {path} was never uploaded")
                ops.append((path, src))
                record["lfs_files"].append(str(path))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((path, None))
                record["deleted"].append(str(path))
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        with hub.lock:
            head, parent = self._branch_head(d, rev), header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"parent commit {parent} is not the head of {rev} ({head})")
            git(d, "checkout", "-q", rev)
            try:
                for path, data in ops:  # data: inline bytes, a stored LFS object, or None to delete
                    target = d / path
                    if data is not None:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        if isinstance(data, bytes):
                            target.write_bytes(data)
                        else:
                            shutil.copyfile(data, target)
                    elif target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
                    else:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                git(d, "add", "-A")
                message = [header.get("summary") or "Update", header.get("description") or ""]
                git(d, "commit", "-q", "--allow-empty", *(a for m in message if m for a in ("-m", m)))
            except Exception:  # all or nothing, like the Hub: drop the half-applied working tree
                git(d, "reset", "-q", "--hard")
                git(d, "clean", "-qfd")
                raise
            oid = git(d, "rev-parse", "HEAD")
        hub.commits.append({**record, "oid": oid})
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(type, repo)}/commit/{oid}",
                     "hookOutput": "", "pullRequestUrl": None}
