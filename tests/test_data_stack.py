"""The Python data stack in the real jail: each library does a small real computation, checked,
within the default limits (512 MiB, pids.max 32) and the jobs' seccomp allowlist.

`make test` installs Debian's packages of it (python3-numpy, -pandas, -matplotlib, -scipy,
-pil, -sympy, with OpenBLAS's threaded build); jobs see the host's /usr.
"""

import hashlib
import json

import pytest

import sandrun
from conftest import SUITE_ENV, Server


def _ok(server, code, files=None, **manifest):
    if files:  # the code as main.py beside the data files, in one multipart upload
        parts = [("main.py", code.encode())] + [(name, data.encode()) for name, data in files.items()]
        doc, logs = server.run_files(parts, {"entrypoint": "main.py", **manifest})
    else:
        doc, logs = server.run(code, **manifest)
    assert (doc["status"], doc["reason"], logs["stderr"]) == ("completed", "exit_code", ""), (doc, logs)
    return doc, logs["stdout"]


def test_numpy_linear_algebra(server):
    code = ("import numpy as np\na = np.array([[4.0, 1.0], [2.0, 3.0]])\nx = np.linalg.solve(a, [1.0, 2.0])\n"
            "w = np.linalg.eigvals(a)\nq, r = np.linalg.qr(np.random.default_rng(1).random((200, 200)))\n"
            "print(np.round(x, 6).tolist(), sorted(np.round(w.real, 6).tolist()), bool(np.allclose(q @ r, q @ r)))")
    assert _ok(server, code)[1] == "[0.1, 0.6] [2.0, 5.0] True\n"


def test_pandas_csv_round_trip(server):
    code = ("import pandas as pd\ndf = pd.read_csv('data.csv')\ndf['total'] = df.price * df.qty\n"
            "df.groupby('kind').total.sum().to_csv('out.csv')\nprint(open('out.csv').read(), end='')")
    files = {"data.csv": "kind,price,qty\na,1.5,2\nb,2.0,3\na,0.5,4\n"}
    doc, out = _ok(server, code, files=files, outputs=["out.csv"])
    assert out == "kind,total\na,5.0\nb,6.0\n"
    assert doc["output_files"]["out.csv"]["size_bytes"] == len(out)


def test_matplotlib_writes_a_png_without_a_display(server):
    code = ("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\n"
            "plt.savefig('plot.png', dpi=50)\nimport matplotlib\nprint(matplotlib.get_backend())")
    doc, out = _ok(server, code)
    assert out.strip().lower() == "agg"
    assert list(doc["output_files"]) == ["plot.png"]  # no font cache among the outputs
    status, _, png = server.request("GET", f"/download/{doc['job_id']}/plot.png")
    assert status == 200 and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert doc["output_files"]["plot.png"]["sha256_hash"] == hashlib.sha256(png).hexdigest()


def test_scipy_optimizes_and_integrates(server):
    code = ("from scipy import integrate, optimize, sparse\nimport numpy as np\n"
            "root = optimize.brentq(lambda x: x * x - 2, 0, 2)\narea = integrate.quad(np.sin, 0, np.pi)[0]\n"
            "m = sparse.identity(1000, format='csr') * 3\nprint(round(root, 9), round(area, 9), m.sum())")
    assert _ok(server, code)[1] == "1.414213562 2.0 3000.0\n"


def test_sympy_integrates_symbolically(server):
    code = "import sympy as s\nx = s.symbols('x')\nprint(s.integrate(s.exp(x) * x, x), s.factor(x**2 - 1))"
    assert _ok(server, code)[1] == "(x - 1)*exp(x) (x - 1)*(x + 1)\n"


def test_pillow_draws_and_reads_back(server):
    code = ("from PIL import Image, ImageDraw\nim = Image.new('RGB', (20, 10), 'white')\n"
            "ImageDraw.Draw(im).rectangle((0, 0, 9, 9), fill=(255, 0, 0))\nim.save('a.png')\n"
            "back = Image.open('a.png')\nprint(back.size, back.getpixel((0, 0)), back.getpixel((15, 5)))")
    assert _ok(server, code)[1] == "(20, 10) (255, 0, 0) (255, 255, 255)\n"


def test_the_job_may_override_the_data_stack_environment(server):
    code = "import os\nprint(os.environ['OPENBLAS_NUM_THREADS'], os.environ['MPLBACKEND'], os.environ['MPLCONFIGDIR'])"
    assert _ok(server, code)[1] == "1 Agg /tmp/matplotlib\n"
    assert _ok(server, code, env={"OPENBLAS_NUM_THREADS": "2", "MPLBACKEND": "svg"})[1] == "2 svg /tmp/matplotlib\n"


@pytest.fixture(scope="module")
def few_pids():
    srv = Server({**SUITE_ENV, "SANDRUN_JOB_PIDS_MAX": "4"}, "few-pids").start()
    yield srv
    srv.stop()


def test_blas_keeps_one_thread_whatever_the_hosts_cpus(few_pids):
    """OpenBLAS starts a thread per host CPU at import: on a big host, more than pids.max allows.
    The default environment holds it to one, so a BLAS-heavy job runs under a tight pids.max."""
    code = ("import numpy as np\na = np.random.default_rng(0).random((600, 600))\nb = a @ a.T\n"
            "threads = open('/proc/self/status').read().split('Threads:')[1].split()[0]\n"
            "print(json.dumps([round(float(np.trace(b)) / 1e5, 2) > 0, int(np.linalg.matrix_rank(b)), threads]))")
    doc, out = _ok(few_pids, "import json\n" + code)
    assert json.loads(out) == [True, 600, "1"], out
    # What the default prevents: left to itself, OpenBLAS takes a thread per CPU of this (2-core) machine.
    doc, out = _ok(few_pids, "import json\n" + code, env={"OPENBLAS_NUM_THREADS": "64"})
    assert int(json.loads(out)[2]) > 1, out


def test_get_root_says_what_a_job_finds(server):
    """GET / lists each language with the version a job sees, and python3's packages as a job imports them."""
    _, _, info = server.json("GET", "/")
    languages = info["languages"]
    assert {name: lang["version"] for name, lang in languages.items()} == info["interpreters"]
    code = ("import importlib, json, platform\nprint(json.dumps([platform.python_version(), "
            f"{{m: importlib.import_module(m).__version__ for m in {list(sandrun.PYTHON_PACKAGES)!r}}}]))")
    assert json.loads(_ok(server, code)[1]) == [languages["python3"]["version"], languages["python3"]["packages"]]
    assert list(languages["python3"]["packages"]) == list(sandrun.PYTHON_PACKAGES)  # make test installs them all
    doc, logs = server.run("console.log(process.versions.node)", "node")
    assert logs["stdout"] == languages["node"]["version"] + "\n"
    doc, logs = server.run('#include <stdio.h>\nint main(void) { printf("%d.%d.%d\\n", __GNUC__, __GNUC_MINOR__, __GNUC_PATCHLEVEL__); }', "c")
    assert logs["stdout"] == languages["c"]["version"] + "\n"
    assert languages["c"] == {"version": languages["c"]["version"], "extensions": [".c"], "compiles": True,
                              "compile_command": "gcc -std=gnu17 -O2 -Wall -pipe <entrypoint> <sources...> -o /tmp/program -lm"}
    assert languages["cpp"]["extensions"] == [".cc", ".cpp", ".cxx"] and languages["cpp"]["compile_command"].startswith("g++ -std=gnu++20 ")
    assert languages["python3"]["compiles"] is False and "compile_command" not in languages["python3"]
    assert all("packages" not in lang for name, lang in languages.items() if name != "python3")


def test_packages_are_found_inside_the_jail_under_its_limits():
    """The host imports pandas; a job held to 32 MiB cannot, so a server with that cap does not offer it."""
    small = Server({**SUITE_ENV, "SANDRUN_JOB_MEMORY_MAX_BYTES": str(32 * sandrun.MiB)}, "small-memory").start()
    try:
        packages = small.json("GET", "/")[2]["languages"]["python3"]["packages"]
        assert "PIL" in packages and "pandas" not in packages, packages
        doc, _ = small.run("import pandas")
        assert (doc["status"], doc["reason"]) == ("failed", "memory_limit"), doc
    finally:
        small.stop()
