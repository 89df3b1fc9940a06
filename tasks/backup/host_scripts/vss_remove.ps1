<#
.SYNOPSIS
Deletes a shadow copy made by vss_snapshot.ps1 and the link that exposed it.

.DESCRIPTION
Idempotent: a shadow copy or link that is already gone counts as removed, so a retried or
repeated removal succeeds. With -CheckOnly nothing is deleted: it reports whether the shadow
copy still exists (VSS deletes copies on its own when their diff area runs out of space).
Prints one JSON object: id, shadow ("removed", "already-gone", "present" or "missing"), link
("removed", "already-gone" or "none").
#>
param(
    [Parameter(Mandatory = $true)][ValidatePattern('^\{[0-9A-Fa-f-]{36}\}$')][string]$ShadowId,
    [ValidatePattern('^[a-z0-9]*$')][string]$SnapshotId = '',
    [switch]$CheckOnly
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3

$shadow = Get-CimInstance -ClassName Win32_ShadowCopy -Filter "ID = '$ShadowId'"

if ($CheckOnly) {
    $state = if ($shadow) { 'present' } else { 'missing' }
    [pscustomobject]@{ id = $ShadowId; shadow = $state; link = 'none' } | ConvertTo-Json -Compress
    return
}

# The link goes first: it points into the shadow copy, and a dangling link would mislead.
$linkState = 'none'
if ($SnapshotId) {
    $link = Join-Path (Join-Path $env:ProgramData 'patchdrill') "snap-$SnapshotId"
    $item = Get-Item -LiteralPath $link -Force -ErrorAction SilentlyContinue
    if ($item) {
        # rmdir on a directory symbolic link removes the link, never the folder it points to.
        $output = & cmd.exe /c rmdir "$link" 2>&1
        if ($LASTEXITCODE -ne 0) { throw "cannot remove link $link : $($output -join ' ')" }
        $linkState = 'removed'
    }
    else {
        $linkState = 'already-gone'
    }
}

$shadowState = 'already-gone'
if ($shadow) {
    Remove-CimInstance -InputObject $shadow
    $shadowState = 'removed'
}

[pscustomobject]@{ id = $ShadowId; shadow = $shadowState; link = $linkState } | ConvertTo-Json -Compress
