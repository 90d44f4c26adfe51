"""rerun.sh's panic hint: the printed one-liner sends the right QMP command."""
import json
import socket
import subprocess
import threading
from types import SimpleNamespace

import pytest

from harness.arch import arch_info
from harness.rerun import QMP_ONE_LINER, panic_arg
from harness.scenario import Scenario


def fake_qmp(path):
    """A QMP server that records the commands it is sent."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)
    got = []

    def serve():
        conn, _ = srv.accept()
        f = conn.makefile("rw")
        f.write('{"QMP": {}}\n')
        f.flush()
        for _ in range(2):
            got.append(json.loads(f.readline()))
            f.write('{"return": {}}\n')
            f.flush()
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return got, t


@pytest.mark.parametrize("arch,expect", [
    ("x86_64", {"execute": "inject-nmi"}),
    ("aarch64", {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": k}
                                                               for k in ("alt", "sysrq", "c")]}}),
])
def test_echoed_one_liner_sends_the_panic(tmp_path, arch, expect):
    sc = Scenario(arch=arch, iommu="none")
    run = SimpleNamespace(arch=arch_info(arch), scenario=sc)
    # the line rerun.sh echoes, as the person sees it on the terminal
    line = f'echo "  {QMP_ONE_LINER.replace(chr(34), chr(92) + chr(34))} {tmp_path}/qmp {panic_arg(run)}"'
    shown = subprocess.run(["bash", "-c", line], capture_output=True, text=True, check=True).stdout.strip()
    got, t = fake_qmp(tmp_path / "qmp")
    subprocess.run(["bash", "-c", shown], check=True, timeout=30, capture_output=True)
    t.join(10)
    assert got == [{"execute": "qmp_capabilities"}, expect]
