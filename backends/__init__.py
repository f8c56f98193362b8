"""Device backends (installed as aiovmm.backends): net, block, console. Arrive with the
device-channel issues."""
