"""The offline demo team: small scripts that follow the specialist contract (SPEC §6)."""
