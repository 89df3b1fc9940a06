# The Windows Time service's state and its last synchronisation, as one JSON object (read by
# tasks/patching/safety/clock.py). Reads only.
$ErrorActionPreference = 'Stop'
$service = Get-Service -Name w32time -ErrorAction SilentlyContinue
$status = if ($null -eq $service) { 'Missing' } else { [string]$service.Status }
$source = ''
$lastSync = ''
if ($status -eq 'Running') {
    $lines = & w32tm /query /status 2>$null
    foreach ($line in $lines) {
        if ($line -match '^Source:\s*(.+)$') { $source = $Matches[1].Trim() }
        elseif ($line -match '^Last Successful Sync Time:\s*(.+)$') { $lastSync = $Matches[1].Trim() }
    }
}
[pscustomobject]@{ service = 'w32time'; status = $status; source = $source; last_sync = $lastSync } |
    ConvertTo-Json -Compress
