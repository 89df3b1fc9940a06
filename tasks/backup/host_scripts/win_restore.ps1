<#
.SYNOPSIS
Writes a restore's changed blocks into an image file on a Windows host, for patchdrill
(docs/repository.md, *Restore*).

.DESCRIPTION
The controller decides which blocks differ (win_blockscan.ps1 -Mode Scan hashes what the target
holds) and sends them in patch files: records of an 8-byte big-endian block index, a 4-byte
big-endian length and the block's bytes.

  -Mode Probe -Path T
      Creates T's parent directory (a fresh DR volume), removes the work file a killed restore
      left (T.patchdrill-restore) and prints {"exists": bool, "kind": "file"|"dir"|null,
      "size": N|null}.
  -Mode Apply -Path T -Patch P -BlockSize B -Size N [-Fresh] [-Finish]
      Writes P's blocks into T (with -Fresh into T.patchdrill-restore, a new target assembled
      beside it), sets the file's length to N, deletes P, and with -Fresh -Finish renames the
      work file to T. Prints {"blocks": n, "bytes": m}.
  -Mode Discard -Path T
      Removes T.patchdrill-restore (a new target's restore that failed).
#>
param(
    [Parameter(Mandatory = $true)][ValidateSet('Probe', 'Apply', 'Discard')][string]$Mode,
    [Parameter(Mandatory = $true)][string]$Path,
    [string]$Patch,
    [long]$BlockSize = 0,
    [long]$Size = 0,
    [switch]$Fresh,
    [switch]$Finish
)
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3
$work = "$Path.patchdrill-restore"

if ($Mode -eq 'Discard') {
    Remove-Item -LiteralPath $work -Force -ErrorAction SilentlyContinue
    exit 0
}

if ($Mode -eq 'Probe') {
    $parent = Split-Path -Parent $Path
    if ($parent -and -not (Test-Path -LiteralPath $parent)) {
        New-Item -ItemType Directory -Force -Path $parent | Out-Null
    }
    Remove-Item -LiteralPath $work -Force -ErrorAction SilentlyContinue
    $item = Get-Item -LiteralPath $Path -ErrorAction SilentlyContinue
    if ($null -eq $item) {
        $found = @{ exists = $false; kind = $null; size = $null }
    } elseif ($item.PSIsContainer) {
        $found = @{ exists = $true; kind = 'dir'; size = $null }
    } else {
        $found = @{ exists = $true; kind = 'file'; size = $item.Length }
    }
    [pscustomobject]$found | ConvertTo-Json -Compress
    exit 0
}

$into = if ($Fresh) { $work } else { $Path }
$blocks = 0
$bytes = 0
$source = [System.IO.File]::OpenRead($Patch)
try {
    $sink = [System.IO.File]::Open($into, [System.IO.FileMode]::OpenOrCreate, [System.IO.FileAccess]::Write,
        [System.IO.FileShare]::None)
    try {
        $header = New-Object byte[] 12
        while ($source.Read($header, 0, 12) -eq 12) {
            # Big-endian on the wire; BitConverter reads this machine's little-endian order.
            [array]::Reverse($header, 0, 8)
            [array]::Reverse($header, 8, 4)
            $index = [BitConverter]::ToInt64($header, 0)
            $length = [BitConverter]::ToInt32($header, 8)
            $data = New-Object byte[] $length
            $read = 0
            while ($read -lt $length) {
                $got = $source.Read($data, $read, $length - $read)
                if ($got -le 0) { throw "patch $Patch ends inside block $index" }
                $read += $got
            }
            [void]$sink.Seek($index * $BlockSize, [System.IO.SeekOrigin]::Begin)
            $sink.Write($data, 0, $length)
            $blocks += 1
            $bytes += $length
        }
        $sink.SetLength($Size)
        $sink.Flush($true)
    } finally {
        $sink.Dispose()
    }
} finally {
    $source.Dispose()
}
Remove-Item -LiteralPath $Patch -Force
if ($Fresh -and $Finish) {
    Move-Item -LiteralPath $work -Destination $Path -Force
}
[pscustomobject]@{ blocks = $blocks; bytes = $bytes } | ConvertTo-Json -Compress
