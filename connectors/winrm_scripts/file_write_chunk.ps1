# Writes one base64 chunk of an upload into a partial file. Offset 0 starts the file afresh;
# any other offset must equal the partial file's length, so a lost or repeated chunk is caught.
param(
    [Parameter(Mandatory = $true)][string]$Path,
    [Parameter(Mandatory = $true)][long]$Offset,
    [Parameter(Mandatory = $true)][string]$Data
)
$ErrorActionPreference = 'Stop'
$bytes = [Convert]::FromBase64String($Data)
if ($Offset -eq 0) {
    $mode = [IO.FileMode]::Create
} else {
    $mode = [IO.FileMode]::Open
}
$stream = [IO.File]::Open($Path, $mode, [IO.FileAccess]::Write, [IO.FileShare]::None)
try {
    if ($stream.Length -ne $Offset) {
        throw "partial file $Path is $($stream.Length) bytes, expected $Offset"
    }
    [void]$stream.Seek($Offset, [IO.SeekOrigin]::Begin)
    $stream.Write($bytes, 0, $bytes.Length)
} finally {
    $stream.Dispose()
}
