"""A durable copy of a run's checkpoints, for spot machines whose disk dies with them.

Frozen decisions:
- Any fsspec URL is a mirror: s3://, gs://, a mounted path, memory:// in tests, and hf://
  (a private Hugging Face Hub repo, through huggingface_hub's HfFileSystem).
- A checkpoint is uploaded file by file, MANIFEST.json (sizes and sha256) last: a mirrored
  checkpoint without its manifest is incomplete and never restored.
- Several nodes with their own disks upload into the same step-N/: each node the files its ranks
  wrote, then parts/rank-R.json (R: the node's first rank) listing them; rank 0's node, once
  every node's part is there, writes MANIFEST.json over all of them. A node that died before its
  part leaves the checkpoint incomplete; rank 0 alone prunes.
- Uploads run in one background thread from hard-linked snapshots, so the training step never
  waits and local pruning cannot pull a file from under an upload.
- Restoring downloads into a temporary directory, verifies every checksum, then renames.
- A mirror that raises or hangs never stops training: a failed upload is retried with backoff
  (5 s doubling to 5 min) in the background while later checkpoints queue behind it (the backlog),
  and status() says how far behind the mirror is, for the progress bar, metrics.jsonl and webhook.
  Only the newest queued checkpoint waits (and milestones): a newer one drops the older, so the
  hard-linked snapshots of checkpoints pruned locally cannot fill the disk during an outage.
  close(timeout) waits a bounded time: a thread stuck in a hung call cannot be stopped, only left.
"""

import json
import os
import shutil
import threading
import time
import warnings

import fsspec

from rodin.io import atomic_write_text, fsync_dir, sha256
from rodin.train.checkpoint import MANIFEST, checkpoint_root, prunable, step_of, verify


def open_url(url):
    """(filesystem, root) of a mirror URL; ValueError naming --mirror and the fix if fsspec cannot open it."""
    try:
        return fsspec.core.url_to_fs(url.rstrip("/"))
    except (ImportError, ValueError, OSError) as e:
        raise ValueError(f"--mirror={url}: fsspec cannot open it ({str(e).splitlines()[0]}); install the filesystem of "
                         "its scheme (s3fs for s3://, gcsfs for gs://, huggingface_hub for hf://) or give a path") from None


class Mirror:
    def __init__(self, url, keep=2, keep_every=0, retry_s=5.0, max_retry_s=300.0, rank=0, owners=(0,), parts_timeout_s=900.0):
        self.rank, self.owners, self.parts_timeout_s = rank, list(owners), parts_timeout_s  # rodin.train.checkpoint.directory_owners
        self.url = url.rstrip("/")
        self.fs, self.root = open_url(self.url)
        self.keep, self.keep_every = keep, keep_every  # as the run directory: the newest `keep` and the milestones
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self.pending = []  # [snapshot, on_done, submit time] not yet on the mirror, oldest first; the first is uploading
        self.changed = threading.Condition()
        self.behind_since = None  # submit time of the oldest checkpoint the mirror has waited for since its last upload
        self.errors = []
        self.thread = None
        self.failures = 0  # failed attempts since the last upload that succeeded
        self.closing, self.given_up = threading.Event(), threading.Event()
        self.staging_cleared = False

    # ---- upload ---------------------------------------------------------------------------

    def submit(self, checkpoint_dir, on_done=None):
        """Queue a complete local checkpoint for upload; returns at once. The queued checkpoints it
        supersedes are dropped (milestones stay): through a long outage the disk holds the snapshots
        of two checkpoints at most, the one uploading and the newest, whatever local pruning removed."""
        snapshot = self._snapshot(checkpoint_dir)
        with self.changed:
            for item in [i for i in self.pending[1:] if not self.is_milestone(i[0])]:
                warnings.warn(f"{self.url}: {os.path.basename(item[0])} dropped from the upload queue, superseded by "
                              f"{os.path.basename(snapshot)} (the mirror is behind; only the newest waits)")
                shutil.rmtree(item[0], ignore_errors=True)
                self.pending.remove(item)
            self.pending.append([snapshot, on_done, time.time()])
            self.behind_since = self.behind_since or time.time()
            self.changed.notify_all()
        if self.thread is None:
            self.closing.clear()
            self.given_up.clear()
            self.thread = threading.Thread(target=self._worker, name="rodin-mirror", daemon=True)
            self.thread.start()

    def is_milestone(self, path):
        return bool(self.keep_every) and step_of(path) % self.keep_every == 0

    def superseded(self, path):
        """Whether a newer checkpoint waits behind this one (a milestone never is superseded)."""
        with self.changed:
            return len(self.pending) > 1 and not self.is_milestone(path)

    def _snapshot(self, checkpoint_dir):
        """Hard links to the checkpoint's files (a copy where links are impossible). A launch's first
        snapshot removes those a killed launch left: their uploads died with it."""
        staging_root = os.path.join(os.path.dirname(os.path.dirname(checkpoint_dir)), ".mirror-staging")
        if not self.staging_cleared:
            shutil.rmtree(staging_root, ignore_errors=True)
            self.staging_cleared = True
        staging = os.path.join(staging_root, os.path.basename(checkpoint_dir))
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for name in os.listdir(checkpoint_dir):
            src, dst = os.path.join(checkpoint_dir, name), os.path.join(staging, name)
            if os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        return staging

    def _worker(self):
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closing.is_set())
                if not self.pending:
                    return
                snapshot, on_done, _ = self.pending[0]
            remote = None
            try:
                remote = self.upload_until_done(snapshot)
                if on_done and remote:
                    on_done(remote)
            finally:
                shutil.rmtree(snapshot, ignore_errors=True)
                with self.changed:
                    self.pending.pop(0)
                    if remote or not self.pending:  # a dropped checkpoint leaves the mirror as far behind
                        self.behind_since = self.pending[0][2] if self.pending else None
                    self.changed.notify_all()

    def upload_until_done(self, snapshot):
        """upload(), again after each failure with a doubling delay: a mirror down for ten minutes
        costs nothing but the wait, and the checkpoints queued meanwhile follow once it answers. A
        checkpoint that fails while a newer one waits behind it is given up for that one."""
        delay, name = self.retry_s, os.path.basename(snapshot)
        while not self.given_up.is_set():
            try:
                remote = self.upload(snapshot)
                self.failures = 0
                return remote
            except Exception as e:  # any error of any filesystem: training must not stop for it
                self.errors.append(e)
                self.failures += 1
                if self.superseded(snapshot):
                    warnings.warn(f"{self.url}: upload of {name} failed ({e}); dropped for the newer checkpoint queued behind it")
                    return None
                warnings.warn(f"{self.url}: upload of {name} failed ({e}); retrying in {delay:.0f} s")
                self.closing.wait(delay)  # at the run's end, retry at the shortest delay
                delay = self.retry_s if self.closing.is_set() else min(2 * delay, self.max_retry_s)

    def status(self):
        """{"mirror_backlog": checkpoints not yet on the mirror, "mirror_behind_s": how long the
        mirror has waited for the oldest of them, "mirror_failures": failed attempts since the last success}."""
        with self.changed:
            backlog, since = len(self.pending), self.behind_since
        return {"mirror_backlog": backlog, "mirror_behind_s": time.time() - since if since else 0.0,
                "mirror_failures": self.failures}

    def upload(self, checkpoint_dir):
        """Copy this node's files of one checkpoint to the mirror and its part list; on rank 0's
        node, once every node's part is there, the manifest, then prune. Blocking."""
        name = os.path.basename(checkpoint_dir)
        remote = f"{self.root}/{name}"
        # a stale partial upload of the same step: one node's, the whole of it; with several, only
        # the manifest (the other nodes may be uploading their parts into it right now)
        stale = remote if self.owners == [0] else f"{remote}/{MANIFEST}"
        if self.rank == 0 and self.fs.exists(stale):
            self.fs.rm(stale, recursive=True)
        files = {}
        for dirpath, _, filenames in os.walk(checkpoint_dir):
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                relative = os.path.relpath(path, checkpoint_dir).replace(os.sep, "/")
                if relative == MANIFEST:
                    continue
                self.fs.makedirs(os.path.dirname(f"{remote}/{relative}"), exist_ok=True)
                self.fs.put_file(path, f"{remote}/{relative}")
                files[relative] = {"size": os.path.getsize(path), "sha256": sha256(path)}
        self.fs.makedirs(f"{remote}/parts", exist_ok=True)
        self.write_whole(f"{remote}/parts/rank-{self.rank}.json", json.dumps(files, indent=2))
        if self.rank != 0:
            return remote
        files = self._wait_for_parts(remote)
        step = step_of(name)
        local_manifest = {"step": step, "whole": True, "files": {k: v["size"] for k, v in files.items()}}
        manifest = {"step": step, "files": files, "local_manifest": local_manifest}
        self.write_whole(f"{remote}/{MANIFEST}", json.dumps(manifest, indent=2))  # the marker: every node's files are there
        self.prune()
        return remote

    def write_whole(self, path, text):
        """A small file that appears whole or not at all: written beside, then moved (a rename on a
        mounted path, one object on a bucket), so a process killed mid-write leaves no half marker."""
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, path)

    def _wait_for_parts(self, remote):
        """Every node's file list of a checkpoint, merged, once all are in the mirror. Given up once
        a newer checkpoint waits behind it: another node may have dropped this one for that one
        (submit), and its part would never come (seen as a run's end hung on a loaded machine)."""
        deadline, poll = time.time() + self.parts_timeout_s, 0.05
        while True:
            missing = [r for r in self.owners if not self.fs.exists(f"{remote}/parts/rank-{r}.json")]
            if not missing:
                break
            if time.time() > deadline or self.given_up.is_set() or self.superseded(remote):
                raise OSError(f"{remote}: the shards of rank(s) {missing} never reached the mirror")
            time.sleep(poll)
            poll = min(2 * poll, 2.0)
        files = {}
        for r in self.owners:
            with self.fs.open(f"{remote}/parts/rank-{r}.json", "r") as f:
                files.update(json.load(f))
        return files

    def prune(self):
        complete = self.complete()
        for name in prunable(complete, self.keep, self.keep_every):
            # the manifest goes first, so a half-deleted checkpoint is never taken for complete
            self.fs.rm(f"{self.root}/{name}/{MANIFEST}")
            self.fs.rm(f"{self.root}/{name}", recursive=True)
        for name in self.checkpoints():  # uploads that never completed (a node died), older than the newest complete
            if complete and name < complete[-1] and name not in complete:
                self.fs.rm(f"{self.root}/{name}", recursive=True)

    def wait(self, timeout=None):
        """Block until every queued upload has finished, at most `timeout` seconds (None: as long as
        it takes); whether they did."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.pending, timeout)

    def close(self, timeout=None):
        """Upload what is queued, waiting at most `timeout` seconds (None: as long as it takes);
        whether everything reached the mirror. A worker stuck in a hung call is left behind."""
        if self.thread is None:
            return True
        with self.changed:
            self.closing.set()
            self.changed.notify_all()
        self.thread.join(timeout)
        done = not self.thread.is_alive()
        if not done:
            self.given_up.set()  # no more retries; a call that hangs stays hung, in a daemon thread
        self.thread = None
        return done

    # ---- restore --------------------------------------------------------------------------

    def checkpoints(self):
        if not self.fs.exists(self.root):
            return []
        names = [os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)]
        return sorted(n for n in names if n.startswith("step-") and not n.endswith(".tmp"))

    def complete(self):
        """Names of mirrored checkpoints whose manifest exists, oldest first."""
        return [n for n in self.checkpoints() if self.fs.exists(f"{self.root}/{n}/{MANIFEST}")]

    def restore_latest(self, run_dir):
        """Download the newest complete, verified mirrored checkpoint into run_dir; its local
        path, or None when the mirror has none."""
        for name in reversed(self.checkpoints()):
            if not self.fs.exists(f"{self.root}/{name}/{MANIFEST}"):
                warnings.warn(f"{self.url}/{name}: no manifest (upload interrupted), trying an older checkpoint")
                continue
            try:
                return self.download(name, run_dir)
            except (OSError, ValueError) as e:
                warnings.warn(f"{self.url}/{name}: {e}, trying an older checkpoint")
        return None

    def download(self, name, run_dir):
        """One complete mirrored checkpoint, whole, into run_dir, verified; its local path."""
        remote = f"{self.root}/{name}"
        with self.fs.open(f"{remote}/{MANIFEST}", "r") as f:
            manifest = json.load(f)
        root = checkpoint_root(run_dir)
        final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for relative, expected in manifest["files"].items():
            local = os.path.join(tmp, *relative.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            self.fs.get_file(f"{remote}/{relative}", local)
            if os.path.getsize(local) != expected["size"] or sha256(local) != expected["sha256"]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ValueError(f"{relative} does not match its manifest checksum")
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest["local_manifest"], indent=2))
        problem = verify(tmp)
        if problem:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(problem)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        return final


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
