"""A critic's checkpoint on this machine before an engine loads it: fetched from the hub with bounded
retries and progress in the server's log, failures said plainly with what to do, and a memory check
that refuses a load the machine cannot hold."""
