"""The two-site set (alpha in region RA, beta in RB, CPU sites) the integration tests share."""


def two_sites(policy: str, delay_s: int = 60, head: str = "") -> str:
    """A sites TOML: a zero-dwell ``[policy]`` named ``policy`` around the 100 threshold, and
    alpha and beta with ``delay_s`` provisioning delays. ``head``: top-level keys (a trace)."""
    sites = "".join(
        f"""
[[sites]]
name = "{name}"
region = "{region}"
gpus = 0
train_kw = 2.0
idle_kw = 0.5
provision_delay_s = {delay_s}
"""
        for name, region in (("alpha", "RA"), ("beta", "RB"))
    )
    return f"""{head}
[policy]
name = "{policy}"
threshold = 100.0
enter_dwell_s = 0
release_delay_s = 0
min_window_s = 0
horizon_s = 600
{sites}"""


# A preset's head for a test run with hand-started (here: in-memory) nodes; str.format it with
# sites, data, tok, runs and run, after appending the [run] knobs and [train].
PRESET_HEAD = """
[launch]
sites = "{sites}"
data_dir = "{data}"
tokenizer_dir = "{tok}"
runs_dir = "{runs}"

[run]
name = "{run}"
provisioner = "none"
"""
