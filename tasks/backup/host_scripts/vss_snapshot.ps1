<#
.SYNOPSIS
Creates a VSS shadow copy of the volume that holds -Path, for a patchdrill backup to read.

.DESCRIPTION
First with writers involved (context ClientAccessibleWriters, VSS_CTX_CLIENT_ACCESSIBLE_WRITERS):
SQL Server, Exchange, the registry and other VSS-aware applications flush and hold their data,
which makes the copy application-consistent. The writers' states are read back afterwards.

When writers fail and -AllowFallback is given:
  * Create refused (a writer or the provider vetoed): a second shadow copy without writers
    (context ClientAccessible). VSS still flushes and holds the volume while it commits, so that
    copy is file-system-consistent.
  * Create succeeded but writers report a failed state: the copy is kept, and reported as
    file-system-consistent, since those writers' data may be mid-write.
Without -AllowFallback both cases delete what was made and fail.

The copy is persistent (it outlives this session, which ends before the backup reads it) and is
exposed through a directory symbolic link under %ProgramData%\patchdrill; vss_remove.ps1 deletes
both. Prints one JSON object: id, device, link, volume, read_path, consistency, context, writers
[{name, state, state_text}], fallback_reason.
#>
param(
    [Parameter(Mandatory = $true)][string]$Path,
    [Parameter(Mandatory = $true)][ValidatePattern('^[a-z0-9]+$')][string]$SnapshotId,
    [switch]$AllowFallback
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3

# Win32_ShadowCopy.Create return values, as documented for the WMI provider.
$CreateErrors = @{
    1 = 'access denied'; 2 = 'invalid argument'; 3 = 'volume not found'; 4 = 'volume not supported'
    5 = 'unsupported shadow copy context'; 6 = 'insufficient storage'; 7 = 'volume is in use'
    8 = 'maximum number of shadow copies reached'; 9 = 'another shadow copy operation is in progress'
    10 = 'the shadow copy provider vetoed the operation'; 11 = 'shadow copy provider not registered'
    12 = 'shadow copy provider failure'; 13 = 'unknown error'
}
# VSS_WRITER_STATE: 6 and above are the VSS_WS_FAILED_AT_* states.
$FirstFailedState = 6

function Get-WriterState {
    # vssadmin's labels are translated; the quoted writer name and the bracketed state number
    # are not, so only those are read.
    $lines = & vssadmin.exe list writers 2>&1
    if ($LASTEXITCODE -ne 0) {
        throw "vssadmin list writers failed (exit $LASTEXITCODE): $($lines -join ' ')"
    }
    $writers = New-Object System.Collections.Generic.List[object]
    $name = $null
    foreach ($line in $lines) {
        $text = [string]$line
        if ($text -match "^\s*[^:']+:\s*'(.+)'\s*$") {
            $name = $Matches[1]
        }
        elseif ($null -ne $name -and $text -match '^\s*[^:\[]+:\s*\[(\d+)\]\s*(.*)$') {
            $writers.Add([pscustomobject]@{ name = $name; state = [int]$Matches[1]; state_text = $Matches[2].Trim() })
            $name = $null
        }
    }
    return , $writers.ToArray()
}

function Resolve-Target([string]$Target) {
    # A bare drive (C: or \\.\C:) is the raw volume; anything else is a file or folder on one.
    if ($Target -match '^(\\\\\.\\)?([A-Za-z]):\\?$' -and $Target -notmatch '^[A-Za-z]:\\$') {
        return [pscustomobject]@{ Kind = 'block'; Full = "$($Matches[2]):\"; Probe = "$($Matches[2]):\" }
    }
    $full = [System.IO.Path]::GetFullPath($Target)
    if (-not (Test-Path -LiteralPath $full)) { throw "no such disk path: $full" }
    $probe = $full
    if (-not $probe.EndsWith('\')) { $probe += '\' }
    return [pscustomobject]@{ Kind = 'path'; Full = $full; Probe = $probe }
}

function Get-VolumeOf([string]$Probe) {
    # The longest volume name that prefixes the path wins, so a volume mounted in a folder of
    # C: is found rather than C: itself.
    $best = $null
    foreach ($volume in @(Get-CimInstance -ClassName Win32_Volume)) {
        $name = [string]$volume.Name
        if (-not $name -or -not $Probe.StartsWith($name, [StringComparison]::OrdinalIgnoreCase)) { continue }
        if ($null -eq $best -or $name.Length -gt ([string]$best.Name).Length) { $best = $volume }
    }
    if ($null -eq $best) { throw "no local volume holds $Probe" }
    return $best
}

function New-ShadowCopy([string]$VolumeName, [string]$Context) {
    $result = Invoke-CimMethod -ClassName Win32_ShadowCopy -MethodName Create -Arguments @{ Volume = $VolumeName; Context = $Context }
    $code = [int]$result.ReturnValue
    if ($code -ne 0) {
        $why = $CreateErrors[$code]
        if (-not $why) { $why = 'undocumented error' }
        return [pscustomobject]@{ Id = $null; Error = "Win32_ShadowCopy.Create($Context) returned $code ($why)" }
    }
    return [pscustomobject]@{ Id = [string]$result.ShadowID; Error = $null }
}

function Remove-ShadowCopy([string]$ShadowId) {
    $shadow = Get-CimInstance -ClassName Win32_ShadowCopy -Filter "ID = '$ShadowId'"
    if ($shadow) { Remove-CimInstance -InputObject $shadow }
}

$target = Resolve-Target $Path
$volume = Get-VolumeOf $target.Probe
$writersBefore = Get-WriterState
$context = 'ClientAccessibleWriters'
$consistency = 'application-consistent'
$fallbackReason = $null

$created = New-ShadowCopy $volume.Name $context
$writers = Get-WriterState
$failed = @($writers | Where-Object { $_.state -ge $FirstFailedState })

if (-not $created.Id) {
    $reason = $created.Error
    if ($failed.Count -gt 0) { $reason += '; failed writers: ' + (($failed | ForEach-Object { "$($_.name) [$($_.state)] $($_.state_text)" }) -join ', ') }
    if (-not $AllowFallback) { throw "application-consistent shadow copy of $($volume.Name) failed: $reason" }
    $context = 'ClientAccessible'
    $consistency = 'file-system-consistent'
    $fallbackReason = "with writers: $reason; took a shadow copy without writers"
    $created = New-ShadowCopy $volume.Name $context
    if (-not $created.Id) { throw "shadow copy of $($volume.Name) failed with and without writers: $($created.Error)" }
}
elseif ($failed.Count -gt 0) {
    $names = ($failed | ForEach-Object { "$($_.name) [$($_.state)] $($_.state_text)" }) -join ', '
    if (-not $AllowFallback) {
        Remove-ShadowCopy $created.Id
        throw "VSS writers failed during the shadow copy of $($volume.Name): $names"
    }
    $consistency = 'file-system-consistent'
    $fallbackReason = "VSS writers failed: $names; the shadow copy is kept as file-system-consistent"
}

$shadow = Get-CimInstance -ClassName Win32_ShadowCopy -Filter "ID = '$($created.Id)'"
if (-not $shadow) { throw "shadow copy $($created.Id) vanished right after it was created" }
$device = [string]$shadow.DeviceObject

$linkRoot = Join-Path $env:ProgramData 'patchdrill'
$link = Join-Path $linkRoot "snap-$SnapshotId"
if ($target.Kind -eq 'block') {
    # The raw shadow volume is read through its device object; a link would show files only.
    $link = $null
    $readPath = $device
}
else {
    New-Item -ItemType Directory -Force -Path $linkRoot | Out-Null
    # mklink rather than New-Item: Windows PowerShell 5.1 refuses a GLOBALROOT target. The
    # trailing backslash makes the link open the shadow volume's root folder.
    $output = & cmd.exe /c mklink /d "$link" "$device\" 2>&1
    if ($LASTEXITCODE -ne 0) {
        Remove-ShadowCopy $created.Id
        throw "cannot link $link to $device : $($output -join ' ')"
    }
    $relative = $target.Full.Substring(([string]$volume.Name).Length).TrimStart('\')
    $readPath = if ($relative) { Join-Path $link $relative } else { $link + '\' }
}

[pscustomobject]@{
    id = $created.Id
    device = $device
    link = $link
    volume = [string]$volume.Name
    read_path = $readPath
    consistency = $consistency
    context = $context
    writers = @($writers | ForEach-Object { [pscustomobject]@{ name = $_.name; state = $_.state; state_text = $_.state_text } })
    writers_failed_before = @($writersBefore | Where-Object { $_.state -ge $FirstFailedState } | ForEach-Object { $_.name })
    fallback_reason = $fallbackReason
} | ConvertTo-Json -Depth 4 -Compress
