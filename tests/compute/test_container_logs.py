"""Container logs for real: conmon's k8s-file log read back marked, capped, kept after delete."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from compute import logs
from compute.drivers.base import InstanceNotFound
from compute.drivers.container import ContainerDriver, container_id
from compute.spec import PowerState
from tests.compute.container_fixtures import SampleImages, driver, leftovers, make_spec, sample_images
from tests.compute.test_container_driver import wait_for

__all__ = ["driver", "sample_images"]

pytestmark = pytest.mark.host


def test_stdout_and_stderr_marked_and_kept_after_delete(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    script = "echo out-1; echo err-1 >&2; sleep 0.3; echo out-2; printf 'no-newline' >&2; exit 4"
    spec = make_spec(sample_images.base, command=("/bin/sh", "-c", script))
    before = time.time_ns()
    driver.spawn(spec)
    wait_for(lambda: driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="exit")
    after = time.time_ns()

    lines, truncated, retained = driver.logs(spec.instance_id, logs.Selection())
    assert not truncated and not retained
    assert [(x.stream, x.text) for x in lines] == [
        ("stdout", "out-1"),
        ("stderr", "err-1"),
        ("stdout", "out-2"),
        ("stderr", "no-newline"),
    ]
    assert all(before <= x.ns <= after for x in lines)
    assert lines[2].ns - lines[0].ns >= 250_000_000  # the sleep shows in the stamps
    # the exit reason still carries the last output
    assert "no-newline" in driver.info(spec.instance_id).message

    only_err, _, _ = driver.logs(spec.instance_id, logs.Selection(stream="stderr"))
    assert [x.text for x in only_err] == ["err-1", "no-newline"]
    since, _, _ = driver.logs(spec.instance_id, logs.Selection(since_ns=lines[2].ns))
    assert [x.text for x in since] == ["out-2", "no-newline"]
    last, _, _ = driver.logs(spec.instance_id, logs.Selection(tail=1))
    assert [x.text for x in last] == ["no-newline"]

    # a new start appends to the same log (conmon opens it for append)
    driver.start(spec.instance_id)
    wait_for(lambda: driver.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="2nd exit")
    both, _, _ = driver.logs(spec.instance_id, logs.Selection())
    texts = ["out-1", "err-1", "out-2", "no-newline"]
    assert [x.text for x in both] == texts * 2 and both[4].ns > lines[-1].ns

    driver.destroy(spec.instance_id)
    assert leftovers(driver, spec) == []
    kept, _, retained = driver.logs(spec.instance_id, logs.Selection())
    assert retained and [x.text for x in kept] == texts * 2

    # past the retention period the node sweeps them; then the logs are gone
    assert driver.keep_logs(now=time.time() + 73 * 3600) == (spec.instance_id,)
    with pytest.raises(InstanceNotFound):
        driver.logs(spec.instance_id, logs.Selection())


def test_log_capped_with_one_previous_file_and_appended_across_restarts(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    cap = 8192
    small = ContainerDriver(dataclasses.replace(driver.config, log_max_bytes=cap))
    # ~100 bytes a line every 10 ms: conmon starts the file afresh about every 0.8 s
    script = "i=0; while [ $i -lt 300 ]; do echo line-$i-$(printf '%080d' 0); i=$((i+1)); usleep 10000; done"
    spec = make_spec(sample_images.base, command=("/bin/sh", "-c", script))
    small.spawn(spec)
    log = small.base / container_id(spec.instance_id) / "container.log"
    rotations = 0
    deadline = time.monotonic() + 30
    while small.info(spec.instance_id).power_state == PowerState.RUNNING and time.monotonic() < deadline:
        rotations += logs.keep_generation(log)
        time.sleep(0.05)
    rotations += logs.keep_generation(log)
    assert rotations >= 2
    sizes = [p.stat().st_size for p in logs.generations(log)]
    assert len(sizes) == 2 and all(s <= cap for s in sizes), sizes
    lines, _, _ = small.logs(spec.instance_id, logs.Selection())
    numbers = [int(x.text.split("-")[1]) for x in lines]
    # the newest lines, contiguous across the two files, ending with the last one printed
    assert numbers == list(range(numbers[0], 300)) and len(numbers) > 60

    small.destroy(spec.instance_id)
    assert leftovers(small, spec) == []


def test_no_retention_deletes_logs_with_the_container(
    driver: ContainerDriver, sample_images: SampleImages
) -> None:
    none = ContainerDriver(dataclasses.replace(driver.config, log_retention_hours=0.0))
    spec = make_spec(sample_images.base, command=("/bin/sh", "-c", "echo bye"))
    none.spawn(spec)
    wait_for(lambda: none.info(spec.instance_id).power_state == PowerState.SHUTDOWN, what="exit")
    none.destroy(spec.instance_id)
    with pytest.raises(InstanceNotFound):
        none.logs(spec.instance_id, logs.Selection())
    assert not any(Path(none.config.state_dir / "logs").rglob("*.log"))
