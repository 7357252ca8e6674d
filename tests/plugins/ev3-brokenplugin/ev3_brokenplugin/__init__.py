raise RuntimeError("ev3-brokenplugin is broken on purpose")
