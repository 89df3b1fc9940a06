"""Where a backup reads a disk from: the source contract (base.py), this machine (local.py), a
host over SSH that scans and sends only changed blocks (remote.py), and a Windows host that
uploads changed blocks straight to Azure Blob (windows_direct_upload.py)."""
