"""xl.cfg-style domain configuration files (aiovmm/config.py) and `aiovmm run -c`."""
from __future__ import annotations

import pytest

from aiovmm.config import ConfigError, parse
from conftest import kernel, run_cli


def test_parse_xl_syntax():
    cfg = parse("""
# comment
name = "web1"
kernel = "/k.elf"   # trailing comment
memory = 16
extra = "ip=198.18.0.2/24 name=web1 # not a comment"
vif = [ 'mac=00:16:3e:01:02:03,bridge=br0',
        'mac=00:16:3e:01:02:04,bridge=br1' ]
disk = ['file:/var/lib/a.img,xvda,w']
""")
    assert (cfg.name, cfg.kernel, cfg.memory) == ("web1", "/k.elf", 16)
    assert cfg.cmdline == "ip=198.18.0.2/24 name=web1 # not a comment"
    assert cfg.vif == ["mac=00:16:3e:01:02:03,bridge=br0", "mac=00:16:3e:01:02:04,bridge=br1"]
    assert cfg.disk == ["file:/var/lib/a.img,xvda,w"]
    assert cfg.maxmem is None
    assert parse('kernel = "/k"\nmemory = 16\nmaxmem = 48\n').maxmem == 48


@pytest.mark.parametrize("text, message", [
    ('kernel = "/k"\nmemroy = 3\n', "unknown setting 'memroy'"),
    ('memory = 3\n', "`kernel` must name"),
    ('kernel = "/k"\nmemory = "lots"\n', "memory must be"),
    ('kernel = "/k"\nvif = [\'a\'\n', "unterminated list"),
    ('kernel = "/k"\nvif = \'a\'\n', "vif must be a list"),
    ('kernel = /k\n', "cannot read value"),
    ('kernel = "/k"\ntype = "hvm"\n', "only PV guests"),
    ('kernel = "/k"\nmemory = 64\nmaxmem = 32\n', "maxmem must be a number of MiB not below memory"),
    ('kernel = "/k"\nmaxmem = "more"\n', "maxmem must be"),
])
def test_bad_configs_are_refused_with_a_reason(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text, "x.cfg")


def test_run_with_a_config_file(tmp_path):
    cfg = tmp_path / "guest.cfg"
    cfg.write_text(f'name = "cfgguest"\nkernel = "{kernel()}"\nmemory = 16\nextra = "ticks=1"\n')
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "cmdline: ticks=1" in r.stdout and r.stdout.rstrip().endswith("poweroff")
    bad = tmp_path / "bad.cfg"
    bad.write_text('kernel = "x"\nmemroy = 3\n')
    r = run_cli("run", "-c", str(bad))
    assert r.returncode == 64 and r.stderr.strip() == f"aiovmm: {bad}:2: unknown setting 'memroy'"
