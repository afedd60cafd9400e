"""The OPC UA output (asyncua; the optional `opcua` extra): config.py (no asyncua import, the
`opcua:` section), server.py (server mode), client.py (client mode with the PLC handshake),
security.py (certificates, users). Outputs are assembled in edge/outputs/."""
