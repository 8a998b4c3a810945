"""README.md stays true: every route and every setting, with its real default."""

import os
import re

import pytest

import sandrun

README = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()


def _table_rows():
    return [line for line in README.splitlines() if line.startswith("|")]


def test_every_route_is_in_the_api_table():
    rows = _table_rows()
    for pattern, methods in sandrun.ROUTES:
        path = pattern.pattern.replace("(?P<job_id>[^/]+)", "{job_id}").replace("(?P<path>.+)", "{path}").replace("\\Z", "").replace("\\.", ".")
        for method in methods:
            assert any(f"| {method} | `{path}` |" in row for row in rows), f"{method} {path} is not in README's API table"


def test_every_setting_is_documented_with_its_default():
    rows = {re.match(r"\| `(SANDRUN_[A-Z_]+)` \|", row).group(1): row for row in _table_rows() if re.match(r"\| `SANDRUN_", row)}
    assert set(rows) == set(sandrun.SETTINGS), set(rows) ^ set(sandrun.SETTINGS)
    for name, default in sandrun.SETTINGS.items():
        cell = rows[name].split("|")[2].strip()
        if name == "SANDRUN_MAX_RUNNING":
            assert cell == "number of CPUs"
        elif default == "":
            assert cell == "empty", (name, cell)
        else:
            assert cell.split()[0].strip("`") == str(default), (name, cell, default)


def test_contract_limits_are_the_defaults():
    """The contract's numbers are what a default server enforces."""
    assert (sandrun.JOB_TIMEOUT_S, sandrun.JOB_MEMORY_MAX_BYTES, sandrun.JOB_PIDS_MAX) == (300, 512 << 20, 32)
    assert (sandrun.OUTPUT_STREAM_MAX_BYTES, sandrun.UPLOAD_MAX_BYTES, sandrun.MANIFEST_MAX_BYTES) == (10 << 20, 100 << 20, 2 << 20)
    assert (sandrun.RATE_CONCURRENT_JOBS, sandrun.RATE_JOBS_PER_HOUR, sandrun.RATE_CPU_S_PER_MIN) == (2, 20, 10)
    assert (sandrun.RESULT_TTL_S, sandrun.WAIT_MAX_S, sandrun.ARGS_MAX, sandrun.STDIN_MAX_BYTES) == (600, 60, 256, 1 << 20)


def test_make_targets_in_readme_exist():
    makefile = open(os.path.join(os.path.dirname(__file__), "..", "Makefile")).read()
    for target in re.findall(r"\| `make ([a-z-]+)` \|", README):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "make run" in README and "make test" in README


IMAGE = os.path.join(os.path.dirname(__file__), "..", "image")


def _image_file(*parts):
    with open(os.path.join(IMAGE, *parts)) as f:
        return f.read()


@pytest.mark.parametrize("name", ["sandrun.conf", "sandrun-cluster.conf"])
def test_nginx_sites_match_the_servers_limits(name):
    site = _image_file("nginx", name)
    assert re.search(r"client_max_body_size (\d+)m;", site).group(1) == str(sandrun.UPLOAD_MAX_BYTES >> 20)
    assert f'"the limit is {sandrun.UPLOAD_MAX_BYTES} bytes"' in site  # nginx's own 413, in the contract's shape
    assert int(re.search(r"proxy_read_timeout (\d+)s;", site).group(1)) > max(sandrun.WAIT_MAX_S, sandrun.JOB_TIMEOUT_S)
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in site  # replaced, never appended: no client can spoof it


def test_nginx_site_matches_the_units_socket():
    site = _image_file("nginx", "sandrun.conf")
    unit = _image_file("mkosi.extra", "etc", "systemd", "system", "sandrun.service")
    socket_path = re.search(r"server (unix:\S+);", site).group(1)
    assert f"Environment=SANDRUN_BIND={socket_path}\n" in unit


def test_the_units_settings_exist_and_its_hardening_is_alphabetical():
    unit = _image_file("mkosi.extra", "etc", "systemd", "system", "sandrun.service")
    for name in re.findall(r"^Environment=(SANDRUN_[A-Z_]+)=", unit, re.M):
        assert name in sandrun.SETTINGS, name
    hardening = unit.split("# Hardening, alphabetical")[1].split("\n\n")[0].splitlines()[1:]
    keys = [line.split("=")[0] for line in hardening if not line.startswith("#")]
    assert keys == sorted(keys), "hardening directives are kept alphabetical"


def test_the_image_runs_the_pinned_dependencies():
    """make image installs requirements.txt itself; Debian's python3-* packages would be other versions.
    The image's python3-* packages are the jobs' data stack, none of them one of Sandrun's own."""
    packages = re.search(r"^Packages=\n((?:    .+\n|#.*\n)+)", _image_file("mkosi.conf"), re.M).group(1)
    packages = [line.strip() for line in packages.splitlines() if line.startswith("    ")]
    ours = {"python3-" + line.split("==")[0].lower().replace("python-", "") for line in open(os.path.join(IMAGE, "..", "requirements.txt"))
            if "==" in line}
    assert "python3-numpy" in packages and not ours & set(packages), (ours, packages)
    pins = [line.split("#")[0].strip() for line in open(os.path.join(IMAGE, "..", "requirements.txt"))]
    # Each pinned exactly; an environment marker may say which Pythons need it (legacy-cgi: 3.13 and later).
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*( ; python_version >= \"3\.\d+\")?", pin) for pin in pins if pin), pins
