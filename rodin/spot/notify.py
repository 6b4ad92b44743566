"""Alerts: a plain JSON POST to a webhook on start, checkpoint, preemption, crash and finish.

Works with anything that accepts JSON (ntfy, Slack/Discord through a bridge, a home server).
Posts are sent from a background thread with a short timeout; a webhook that is down or slow
never delays or stops training, it only earns a warning.
"""

import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings


class Notifier:
    def __init__(self, url, run_name, timeout=5.0):
        self.url, self.run_name, self.timeout = url, run_name, timeout
        self.queue = queue.Queue()
        self.thread = None
        if url:
            self.thread = threading.Thread(target=self._worker, name="rodin-notify", daemon=True)
            self.thread.start()

    def send(self, event, **fields):
        """Queue one event; returns at once. Without a URL, does nothing."""
        if self.thread is not None:
            self.queue.put({"event": event, "run": self.run_name, "time": time.time(), "host": socket.gethostname(), **fields})

    def _worker(self):
        while True:
            payload = self.queue.get()
            if payload is None:
                self.queue.task_done()
                return
            try:
                request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"),
                                                 headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                warnings.warn(f"webhook {self.url}: {payload['event']} not delivered ({e})")
            finally:
                self.queue.task_done()

    def close(self, wait_s=10.0):
        """Deliver what is queued (waiting at most about wait_s), then stop the thread."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join(timeout=wait_s)
        self.thread = None
