"""Test machinery shipped with riprap: a virtual clock for the engine (`clock`) and a
fault-controllable upstream server (`faults`). Not used by the runtime packages."""
