# Prints up to $Count bytes of a file from $Offset, as base64 on one line.
param(
    [Parameter(Mandatory = $true)][string]$Path,
    [Parameter(Mandatory = $true)][long]$Offset,
    [Parameter(Mandatory = $true)][int]$Count
)
$ErrorActionPreference = 'Stop'
$stream = [IO.File]::Open($Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::Read)
try {
    [void]$stream.Seek($Offset, [IO.SeekOrigin]::Begin)
    $buffer = New-Object byte[] $Count
    $read = 0
    while ($read -lt $Count) {
        $got = $stream.Read($buffer, $read, $Count - $read)
        if ($got -le 0) { break }
        $read += $got
    }
    [Console]::Out.Write([Convert]::ToBase64String($buffer, 0, $read))
} finally {
    $stream.Dispose()
}
