"""The `preview` backend: a CPU-only talking portrait that needs no weights (`generator`), found
(`face`), fitted (`landmarks`) and warped (`rig`) from the portrait's own pixels."""
