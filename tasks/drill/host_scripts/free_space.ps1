# Free space where a drill or failover would restore on a Windows DR target (readiness).
# The copy root may not exist yet: the volume of its nearest existing parent is measured.
# Prints one JSON object: {"path": <the existing directory measured>, "volume": <its root>,
# "free": <bytes available to the caller>}.
param(
    [Parameter(Mandatory = $true)][string]$Path
)
$ErrorActionPreference = 'Stop'

$probe = $Path
while ($probe -and -not (Test-Path -LiteralPath $probe)) {
    $probe = Split-Path -Parent $probe
}
if (-not $probe) {
    $probe = [System.IO.Path]::GetPathRoot($Path)
}
$full = (Resolve-Path -LiteralPath $probe).ProviderPath
$volume = [System.IO.Path]::GetPathRoot($full)
$drive = New-Object System.IO.DriveInfo($volume)
[pscustomobject]@{ path = $full; volume = $volume; free = $drive.AvailableFreeSpace } | ConvertTo-Json -Compress
