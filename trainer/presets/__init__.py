"""Named training presets (JSON), loadable with `mmrank train --preset NAME`."""
