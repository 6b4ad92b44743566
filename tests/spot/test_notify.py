"""rodin/spot/notify.py: webhook events arrive; a dead webhook never disturbs the caller."""

import time
import warnings

from rodin.spot.notify import Notifier


def test_a_webhook_on_localhost_receives_the_events_in_order(webhook):
    url, received = webhook
    notifier = Notifier(url, run_name="demo")
    notifier.send("start", step=0)
    notifier.send("checkpoint", step=10)
    notifier.send("finish", step=20, val_loss=3.2)
    notifier.close()
    assert [(r["event"], r["step"]) for r in received] == [("start", 0), ("checkpoint", 10), ("finish", 20)]
    assert received[-1]["run"] == "demo" and received[-1]["val_loss"] == 3.2


def test_an_unreachable_webhook_only_warns_and_never_blocks():
    notifier = Notifier("http://127.0.0.1:9/nothing-listens-here", run_name="demo", timeout=0.5)
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(5):
            notifier.send("checkpoint", step=i)
        assert time.time() - start < 0.1  # sending is queueing
        notifier.close()
    assert any("not delivered" in str(w.message) for w in caught)


def test_without_a_url_nothing_is_sent():
    notifier = Notifier("", run_name="demo")
    notifier.send("start")
    notifier.close()
    assert notifier.thread is None
